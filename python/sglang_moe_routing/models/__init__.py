"""SGLang model files shipped by sglang-moe-routing.

Each module defines ``EntryClass`` as SGLang's own model files do, so this package can be
handed to SGLang's ``import_model_classes`` (or ``SGLANG_EXTERNAL_MODEL_PACKAGE``). The
plugin registers them with SGLang's ``ModelRegistry`` (see ``integration/omni_hooks.py``).
"""
