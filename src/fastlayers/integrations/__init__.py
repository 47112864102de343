"""L4: model injection (HF transformers, diffusers) and torch.distributed helpers.

Submodules import their third-party packages inside functions: `fastlayers.integrations.hf` (`patch_bert`, ...),
`fastlayers.integrations.sparse_attention_utils` (`SparseAttentionUtils`), `fastlayers.integrations.random_ltd`
(`convert_to_random_ltd`, ...), `fastlayers.integrations.diffusers` (`generic_injection`, ...).
"""
