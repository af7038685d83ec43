"""The loss head's own activation memory: the model's head (lm_head -> fp32 logits ->
cross-entropy) against RevModel's chunked head, on the hidden states of a final norm.

    python benchmarks/head_memory.py

Measured with revffn_fx.tools.measure_memory: bytes saved for backward, and the peak of live tensors
during forward + backward of the head alone (its input and weight excluded).
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from revffn_fx.runtime.layers import RuntimeOptions
from revffn_fx.runtime.loss import ChunkedLossHead
from revffn_fx.tools.measure_memory import peak_live_bytes, saved_tensor_bytes

MiB = 2**20


def original(h: torch.Tensor, head: torch.nn.Linear, labels: torch.Tensor) -> torch.Tensor:
    # what transformers' ForCausalLMLoss does after lm_head
    logits = head(h).float()
    return F.cross_entropy(logits.view(-1, logits.shape[-1]), labels.view(-1), ignore_index=-100)


def main() -> None:
    argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args()  # --help only
    torch.set_num_threads(2)
    print("config | head | saved MiB | peak live MiB (forward + backward)")
    for name, batch, seq, vocab in (("benchmark config (vocab 1024)", 4, 256, 1024),
                                    ("32k vocabulary", 4, 1024, 32000)):
        torch.manual_seed(0)
        head = torch.nn.Linear(256, vocab, bias=False)
        h = torch.randn(batch, seq, 256, requires_grad=True)
        labels = torch.randint(0, vocab, (batch, seq))
        chunked = ChunkedLossHead(head, torch.nn.Identity(), RuntimeOptions())
        figures = {}
        runs = (("original", lambda h=h, w=head, y=labels: original(h, w, y)),
                ("chunked", lambda h=h, c=chunked, y=labels: c(h, y)))
        for label, fn in runs:
            saved, loss = saved_tensor_bytes(fn)
            del loss

            def step(f=fn) -> None:
                f().backward()

            peak, _ = peak_live_bytes(step)
            h.grad = None
            head.weight.grad = None
            figures[label] = (saved, peak)
            print(f"{name} | {label} | {saved / MiB:.2f} | {peak / MiB:.2f}", flush=True)
        ratio = figures["chunked"][0] / figures["original"][0]
        print(f"{name} | chunked / original saved: {ratio:.3f}")


if __name__ == "__main__":
    main()
