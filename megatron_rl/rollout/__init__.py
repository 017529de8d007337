"""Generation engines (embedded transformers, SGLang), weight sync and the group sampler."""
