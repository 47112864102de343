"""L4: model injection (HF transformers BERT/RoBERTa) and torch.distributed helpers.

Submodules import their third-party packages inside functions: `fastlayers.integrations.hf`
(`patch_bert`, ...), `fastlayers.integrations.sparse_attention_utils` (`SparseAttentionUtils`).
"""
