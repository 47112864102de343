"""A HF BERT patched with `fastlayers.integrations.hf.patch_bert`: same outputs and gradients, then training steps.

Tiny random BERT built from a config (no downloads), CPU, well under a minute:

    python examples/bert_patch_demo.py
"""

import copy
import time

import torch
from tqdm import tqdm
from transformers import BertConfig, BertForSequenceClassification

from fastlayers.integrations.hf import convert_model_state_dict, patch_bert
from fastlayers.nn.transformer_layer import TransformerLayer


def main() -> None:
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=1000, hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                     intermediate_size=512, max_position_embeddings=128, num_labels=2)  # fmt: skip
    model = BertForSequenceClassification(cfg)
    patched = copy.deepcopy(model)
    n = patch_bert(patched, normalize_invertible=True, gelu_checkpoint=True, attn_dropout_checkpoint=True)
    print(f"patch_bert replaced {n} BertLayer modules with {TransformerLayer.__name__} (all three memory flags on)")

    # 1. same outputs and gradients (dropout off), with padding in the batch
    B, S = 8, 64
    ids = torch.randint(0, cfg.vocab_size, (B, S))
    mask = torch.ones(B, S, dtype=torch.long)
    mask[B // 2 :, S // 2 :] = 0
    labels = torch.randint(0, 2, (B,))
    model.eval()
    patched.eval()
    ref = model(input_ids=ids, attention_mask=mask, labels=labels)
    out = patched(input_ids=ids, attention_mask=mask, labels=labels)
    ref.loss.backward()
    out.loss.backward()
    max_logit = (out.logits - ref.logits).abs().max().item()
    grads = convert_model_state_dict({k: p.grad for k, p in patched.named_parameters()}, to="hf")
    max_grad = max((grads[k] - p.grad).abs().max().item() for k, p in model.named_parameters())
    print(f"max |logits - HF| = {max_logit:.2e}, max |grad - HF| over all parameters = {max_grad:.2e}")
    assert max_logit < 1e-4 and max_grad < 1e-4, "patched model does not match the original"

    # 2. a few training steps (dropout 0.1 on, AdamW) on a toy task: label = parity of the first token
    patched.train()
    opt = torch.optim.AdamW(patched.parameters(), lr=1e-3)
    steps = 30
    t0 = time.perf_counter()
    bar = tqdm(range(steps), desc="train (patched BERT)", unit="step")
    for _ in bar:
        ids = torch.randint(0, cfg.vocab_size, (B, S))
        loss = patched(input_ids=ids, attention_mask=mask, labels=ids[:, 0] % 2).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    print(f"{steps} training steps in {time.perf_counter() - t0:.1f} s, last loss {loss.item():.3f}")


if __name__ == "__main__":
    main()
