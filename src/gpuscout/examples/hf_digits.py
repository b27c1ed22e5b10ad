"""Example job: a tiny BERT trained by the Hugging Face ``Trainer`` on the
8x8 digits, moved by GPU Scout through ``GpuScoutCallback``.

    python -m gpuscout.examples.hf_digits --steps N [--seed K] [--step-sleep S]
        [--out DIR] [--checkpoint-every M] [--port P] [--threads T]

Needs ``pip install transformers accelerate`` besides the ``torch`` extra.
Nothing is fetched: the model is a ``BertForSequenceClassification`` built
from a ``BertConfig`` in code (one layer, hidden size 32, dropout 0.1), and
the data is ``sklearn.datasets.load_digits`` (1797 images shipped with
scikit-learn), each image read as a sequence of 65 tokens: a [CLS] token
then one token per pixel and intensity (pixel p of intensity v, 0..16, is
the token 17p + v). One step is one batch of 32 on the
CPU: AdamW, 10 warm-up steps then a constant learning rate (a schedule
that does not depend on ``--steps``, so a run can be extended: stopped at
``--steps 60`` and started again with ``--steps 120`` it ends as a
120-step run), shuffled batches, ``report_to=[]``, no Trainer checkpoints
of its own (``save_strategy="no"``): GPU Scout's are the Trainer's full
checkpoints, taken when the agent asks and every ``--checkpoint-every``
steps.

Exactness: with a fixed thread count (``--threads``, default 1) and
deterministic algorithms, a run restored from a checkpoint, here or after a
move under the control plane, ends with the weights, optimizer state and
torch generator of a run never interrupted, tensor for tensor (see
``gpuscout.integrations.transformers`` for what the Trainer restores).

Endpoints (``--port`` standalone; under the agent, through its address):
``GET /status`` -> {"instance_id", "step", "loss", "total_steps"}.
Writes ``model.pt`` at the end: ``torch.save`` of {"model": state_dict,
"optimizer": state_dict, "torch_rng": the CPU generator's state, "steps":
N, "seed": K, "accuracy": float} (load with ``torch.load(path,
weights_only=True)``), into ``--out`` standalone or the job's artifacts
under the control plane. The Trainer's ``output_dir`` is
``<out>/.hf_digits`` (logs only).
"""

from __future__ import annotations

import argparse
import io
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

from gpuscout import workload
from gpuscout.examples.torch_digits import digits_parser, serve_status

BATCH_SIZE = 32
LEARNING_RATE = 5e-3
WARMUP_STEPS = 10
LOG_EVERY = 20
LEVELS = 17  # pixel intensities 0..16
CLS_TOKEN = 64 * LEVELS  # pixel p of intensity v is the token p * 17 + v
SEQ_LEN = 65

log = logging.getLogger("gpuscout.examples.hf_digits")


def build_parser() -> argparse.ArgumentParser:
    return digits_parser(
        "hf_digits",
        "Train a tiny BERT on the 8x8 digits with the Hugging Face Trainer (GPU Scout example "
        "job).")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(stream=sys.stderr, level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        import torch
        from sklearn.datasets import load_digits  # type: ignore[import-untyped]
        from transformers import (
            BertConfig,
            BertForSequenceClassification,
            PrinterCallback,
            Trainer,
            TrainerCallback,
            TrainingArguments,
            set_seed,
        )
        from transformers.utils import logging as hf_logging

        from gpuscout.integrations.transformers import GpuScoutCallback
    except ImportError as exc:
        print(f"hf_digits: {exc.name} is not installed; install it: pip install "
              "'gpuscout[torch]' transformers accelerate", file=sys.stderr)
        return 3

    hf_logging.set_verbosity_warning()
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    set_seed(args.seed)

    digits = load_digits()
    pixels = torch.tensor(digits.data, dtype=torch.long) + LEVELS * torch.arange(64)
    tokens = torch.cat([torch.full((len(pixels), 1), CLS_TOKEN), pixels], dim=1)
    dataset = [{"input_ids": row, "labels": int(label)}
               for row, label in zip(tokens, digits.target, strict=True)]

    config = BertConfig(vocab_size=CLS_TOKEN + 1, hidden_size=32, num_hidden_layers=1,
                        num_attention_heads=2, intermediate_size=64,
                        max_position_embeddings=SEQ_LEN, type_vocab_size=1,
                        initializer_range=0.1)
    config.num_labels = 10
    model = BertForSequenceClassification(config)
    training_args = TrainingArguments(
        output_dir=str(Path(args.out) / ".hf_digits"),
        max_steps=args.steps,
        per_device_train_batch_size=BATCH_SIZE,
        learning_rate=LEARNING_RATE,
        lr_scheduler_type="constant_with_warmup",
        warmup_steps=WARMUP_STEPS,
        seed=args.seed,
        report_to=[],
        save_strategy="no",
        logging_steps=LOG_EVERY,
        disable_tqdm=True,
        use_cpu=True,
        dataloader_num_workers=0,
    )

    total, step_sleep = args.steps, args.step_sleep

    class Progress(TrainerCallback):  # type: ignore[misc]
        """Log lines on stderr, and the simulated slower GPU."""

        def on_step_end(self, *_: Any, **__: Any) -> None:
            if step_sleep:
                time.sleep(step_sleep)

        def on_log(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            logs = kwargs.get("logs") or {}
            if "loss" in logs:
                log.info("step %d/%d loss %.4f lr %.2e", state.global_step, total,
                         logs["loss"], logs.get("learning_rate", math.nan))

    run = workload.init(checkpoint_every=args.checkpoint_every, default_dir=args.out)
    with run:
        trainer = Trainer(model=model, args=training_args, train_dataset=dataset,
                          callbacks=[Progress()])
        trainer.remove_callback(PrinterCallback)  # Progress logs instead, on stderr
        gpuscout = GpuScoutCallback(run, trainer=trainer)

        if not serve_status(run, "hf_digits", args.port, args.steps,
                            lambda: (gpuscout.step, gpuscout.loss)):
            return 1

        try:
            checkpoint = gpuscout.resume_from_checkpoint()
        except ValueError as exc:  # another script's checkpoint
            print(f"hf_digits: {exc}; use another --out or delete its .checkpoints folder",
                  file=sys.stderr)
            return 2
        if checkpoint is not None:
            start = gpuscout.restored_step or 0
            if start > args.steps:
                print(f"hf_digits: the checkpoint found (step {start}) is past --steps "
                      f"{args.steps}; use another --out or delete its .checkpoints folder",
                      file=sys.stderr)
                return 2
            log.info("resuming after step %d", start)
            gpuscout.step = start
        else:
            gpuscout.step = 0

        trainer.train(resume_from_checkpoint=checkpoint)

        model.eval()
        with torch.no_grad():
            logits = model(input_ids=tokens).logits
            accuracy = float((logits.argmax(1) == torch.tensor(digits.target)).float().mean())
        assert trainer.optimizer is not None
        buffer = io.BytesIO()
        torch.save({"model": model.state_dict(), "optimizer": trainer.optimizer.state_dict(),
                    "torch_rng": torch.get_rng_state(), "steps": args.steps,
                    "seed": args.seed, "accuracy": accuracy}, buffer)
        where = run.save_artifact("model.pt", buffer.getvalue())
        log.info("trained %d steps (accuracy on the data %.3f); model written to %s",
                 args.steps, accuracy, where)
    return 0


if __name__ == "__main__":
    sys.exit(main())
