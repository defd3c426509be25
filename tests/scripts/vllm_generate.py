"""Greedy answers of vLLM for a saved model folder, in a process of its own (vLLM spawns its engine processes,
so it must run under ``if __name__ == "__main__"``). Used by tests/evaluation/test_vllm_serving.py.

python tests/scripts/vllm_generate.py MODEL_FOLDER REQUESTS.json OUT.json

REQUESTS.json is a list of ``{"images": [path, ...], "question": str, "max_tokens": int}``. Each request is
answered twice: through ``LLM.generate`` on the prompt the checkpoint's chat template gives (the model card's
recipe), and through ``LLM.chat`` (the chat template applied by vLLM, as ``vllm serve`` does for
/v1/chat/completions). OUT.json gets one ``{"generate": {"text", "token_ids"}, "chat": {...}}`` per request.
"""

from __future__ import annotations

import json
import sys


def main(model: str, requests_file: str, out_file: str) -> None:
    from PIL import Image
    from transformers import AutoProcessor
    from vllm import LLM, SamplingParams

    requests = json.loads(open(requests_file).read())
    processor = AutoProcessor.from_pretrained(model)
    llm = LLM(
        model=model,
        dtype="float32",
        gpu_memory_utilization=0.15,
        enforce_eager=True,
        limit_mm_per_prompt={"image": 1},
        max_model_len=4096,
        seed=0,
    )
    answers = []
    for request in requests:
        images = [Image.open(path).convert("RGB") for path in request["images"]]
        content = [*([{"type": "image"}] * len(images)), {"type": "text", "text": request["question"]}]
        prompt = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
        params = SamplingParams(temperature=0.0, max_tokens=request["max_tokens"], skip_special_tokens=False)
        [generated] = llm.generate({"prompt": prompt, "multi_modal_data": {"image": images[0]}}, params)
        chat_content = [
            *({"type": "image_pil", "image_pil": image} for image in images),
            {"type": "text", "text": request["question"]},
        ]
        [chatted] = llm.chat([{"role": "user", "content": chat_content}], params)
        answers.append(
            {
                name: {"text": output.outputs[0].text, "token_ids": list(output.outputs[0].token_ids)}
                for name, output in (("generate", generated), ("chat", chatted))
            }
        )
    with open(out_file, "w") as f:
        json.dump(answers, f)


if __name__ == "__main__":
    main(*sys.argv[1:4])
