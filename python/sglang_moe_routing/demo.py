"""``python -m sglang_moe_routing.demo``: see ``sglang_moe_routing.integration.demo``."""

import sys

from sglang_moe_routing.integration.demo import main

if __name__ == "__main__":
    sys.exit(main())
