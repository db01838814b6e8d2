"""Tools shared by the GPU server tests and the serving benchmark: random-weight model
builders (``models``) and a ``launch_server`` process wrapper with a ``/generate`` client
(``server``). They import sglang only inside the server subprocess."""
