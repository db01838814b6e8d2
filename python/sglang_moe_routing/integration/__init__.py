"""SGLang integration: the plugin entry point, flags and hooks (imports sglang; the model
files live in ``sglang_moe_routing.models``)."""
