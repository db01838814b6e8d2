"""SGLang integration (the only subpackage that imports sglang)."""
