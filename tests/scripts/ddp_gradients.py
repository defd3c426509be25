"""Run under torchrun: each process takes its half of a fixed batch; rank 0 saves the synced gradients.

torchrun --nproc_per_node 2 tests/scripts/ddp_gradients.py DATASET OUT.pt
"""

import sys

import torch
from accelerate import Accelerator

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))
from test_train_loop import example_batches, tiny_loss_module  # noqa: E402

from granite_docling.optimization import backward_step  # noqa: E402

dataset, out = sys.argv[1], sys.argv[2]
accelerator = Accelerator(cpu=True)
loss_module, processor = tiny_loss_module()
loss_module = accelerator.prepare(loss_module)
examples = example_batches(dataset, processor)
per_process = len(examples) // accelerator.num_processes
mine = examples[accelerator.process_index * per_process : (accelerator.process_index + 1) * per_process]
# two micro-batches of one sample each on every process: accumulation and processes together
loss, tokens, _ = backward_step(accelerator, loss_module, mine)
if accelerator.is_main_process:
    grads = {
        n: p.grad.clone() for n, p in accelerator.unwrap_model(loss_module).named_parameters() if p.grad is not None
    }
    torch.save({"grads": grads, "loss": loss, "tokens": tokens}, out)
accelerator.wait_for_everyone()
