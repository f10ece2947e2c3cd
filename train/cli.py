"""`streamvlm-train`: LightningCLI for router training, plus `export`.

    streamvlm-train fit --config train/configs/tiny_cpu.yaml
    streamvlm-train fit --config train/configs/tiny_cpu.yaml --ckpt_path last     # resume
    streamvlm-train fit --config train/configs/tiny_cpu.yaml --trainer.default_root_dir DIR   # everything under DIR
    streamvlm-train export CKPT OUT_DIR                                           # -> router folder
    streamvlm-train export-model CKPT OUT_DIR               # a trainable: model run -> checkpoint folder
    streamvlm-train vision --out runs/world_vision/model     # stage 0 of the world model: the vision tower
    streamvlm-train bench [--family qwen2_5_vl] [--json]  # a training step, routed vs dense, time and memory
    streamvlm-train plot runs/tiny_cpu/csv/metrics.csv loss.svg                   # the loss curves
    python -m streamvlm.train ...                                                 # the same

Every LightningCLI flag works (`--trainer.strategy ddp`, `--trainer.precision bf16-mixed`, ...);
`streamvlm-train fit --help` lists them.
"""

from __future__ import annotations

import sys

from streamvlm.errors import StreamVLMError


def _cli_class():
    from lightning.pytorch.cli import LightningCLI

    class StreamVLMTrainCLI(LightningCLI):
        def add_arguments_to_parser(self, parser) -> None:
            # One checkpoint for both: the data module reads its preprocessing config. Lightning also refuses
            # to start when the two hold different model_dir hparams.
            parser.link_arguments("model.model_dir", "data.model_dir")

        def before_instantiate_classes(self) -> None:
            config = self.config[self.subcommand] if self.subcommand else self.config
            _root_run_outputs(config.trainer)

        def before_fit(self) -> None:
            # The data module preprocesses and samples frames as the model's checkpoint says, and fits every
            # sample to the model's context (a record too long is split at exchange boundaries, never cut
            # inside an answer).
            from streamvlm.train.data import FrameSampling, TokenBudget

            adapter = self.model.vlm.adapter
            self.datamodule.set_preprocess_config(adapter.preprocess_config)
            self.datamodule.set_frame_sampling(FrameSampling.from_checkpoint(adapter.model_dir))
            self.datamodule.set_token_budget(TokenBudget.for_adapter(adapter))

        before_validate = before_fit

    return StreamVLMTrainCLI


def _root_run_outputs(trainer) -> None:
    """Put what a run writes under `trainer.default_root_dir` unless the config names another folder.

    Loggers whose `save_dir` is unset (ours: streamvlm.train.loggers) get the root folder, and checkpoint
    callbacks without a `dirpath` get ROOT/checkpoints, where `--ckpt_path last` then finds last.ckpt.
    Lightning's own default for the latter would be the first logger's folder (ROOT/csv/checkpoints); we
    keep the shorter path the docs and configs name. A `dirpath` or `save_dir` set anywhere (config file or
    `--trainer.callbacks...dirpath`) is left alone.
    """
    import os

    from jsonargparse import Namespace
    from lightning.pytorch.callbacks import ModelCheckpoint

    root = trainer.default_root_dir or os.getcwd()  # Lightning's own default root is the working folder

    def entries(value) -> list:
        items = value if isinstance(value, list) else [value]
        return [item for item in items if isinstance(item, Namespace) and item.get("init_args") is not None]

    for logger in entries(trainer.logger):
        if "save_dir" in logger.init_args and logger.init_args.save_dir is None:
            logger.init_args.save_dir = root
    for callback in entries(trainer.callbacks):
        if _is_subclass(callback.class_path, ModelCheckpoint) and callback.init_args.get("dirpath") is None:
            callback.init_args.dirpath = os.path.join(root, "checkpoints")


def _is_subclass(class_path: str, base: type) -> bool:
    import importlib

    # jsonargparse has already imported the class and written its full dotted path here
    module, _, name = class_path.rpartition(".")
    cls = getattr(importlib.import_module(module), name, None)
    return isinstance(cls, type) and issubclass(cls, base)


def export_main(argv: list[str]) -> int:
    import argparse

    from streamvlm.train.module import export_router

    parser = argparse.ArgumentParser(prog="streamvlm-train export",
                                     description="Write a training checkpoint's router as a router folder "
                                                 "(routing.json + router.safetensors) that "
                                                 "StreamVLM.from_pretrained(model, routing=OUT_DIR) loads.")
    parser.add_argument("checkpoint", help="a .ckpt written by streamvlm-train fit (e.g. .../checkpoints/last.ckpt)")
    parser.add_argument("out_dir", help="router folder to write")
    args = parser.parse_args(argv)
    out = export_router(args.checkpoint, args.out_dir)
    print(f"wrote router to {out}")
    return 0


def export_model_main(argv: list[str]) -> int:
    import argparse

    from streamvlm.train.world_model import export_model

    parser = argparse.ArgumentParser(prog="streamvlm-train export-model",
                                     description="Write the model of a full-training checkpoint (model.trainable: "
                                                 "model) as a Hugging Face checkpoint folder that --model loads.")
    parser.add_argument("checkpoint", help="a .ckpt written by streamvlm-train fit")
    parser.add_argument("out_dir", help="checkpoint folder to write (replaced if it exists)")
    args = parser.parse_args(argv)
    out = export_model(args.checkpoint, args.out_dir)
    print(f"wrote the model to {out}")
    return 0


def vision_main(argv: list[str]) -> int:
    import argparse
    import logging

    from streamvlm.train.vision import pretrain_tower

    parser = argparse.ArgumentParser(
        prog="streamvlm-train vision",
        description="Stage 0 of the world model: train the vision tower and projector to label every token "
                    "of random world frames with what covers its cell (colour, shape, size, and where that "
                    "object's centre is), then write the checkpoint with them. The language model is copied "
                    "unchanged; train it next with train/configs/world_model.yaml (model.model_dir: the folder "
                    "written here).")
    parser.add_argument("--model", help="checkpoint folder to start from (default: the untrained world model)")
    parser.add_argument("--out", default="runs/world_vision/model", help="checkpoint folder to write "
                        "(replaced if it exists; default: %(default)s)")
    parser.add_argument("--steps", type=int, default=1200, help="optimizer steps (default: %(default)s)")
    parser.add_argument("--batch", type=int, default=32, help="frames per step (default: %(default)s)")
    parser.add_argument("--lr", type=float, default=2e-3, help="peak AdamW learning rate (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the frames and the head (default: %(default)s)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.model is None:
        from streamvlm.train.world_model import initial_model_dir

        args.model = str(initial_model_dir())
    last = pretrain_tower(args.model, args.out, steps=args.steps, batch=args.batch, lr=args.lr, seed=args.seed)
    print(f"wrote the model to {args.out} ({', '.join(f'{k} {v}' for k, v in last.items())})")
    return 0


HELP = """\
usage: streamvlm-train COMMAND [OPTIONS]

Train routers (and optionally LoRA or the whole model) with Lightning, and turn what training writes into
folders the runtime loads.

commands:
  fit           train: streamvlm-train fit --config train/configs/tiny_cpu.yaml (--ckpt_path last resumes)
  validate      one evaluation pass over the validation set
  test          one evaluation pass over the test set
  predict       run the model over the prediction set
  export        write a training checkpoint's router as a router folder (for --routing)
  export-model  write a full-training checkpoint's model as a checkpoint folder (for --model)
  vision        stage 0 of the world model: train the vision tower and projector
  bench         a training step, routed vs dense: time and memory
  plot          draw the loss curves of a run's metrics.csv as an SVG

`streamvlm-train COMMAND --help` lists a command's options; fit, validate, test and predict take every
LightningCLI flag (--config, --trainer.strategy ddp, --trainer.precision bf16-mixed, ...).
"""


def main(argv: list[str] | None = None) -> int:
    # LightningCLI reads sys.argv itself when given no args (and warns when given both)
    lightning_args = argv
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        # our own help: Lightning's lists only its four subcommands, after a warning
        print(HELP, end="", file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    try:
        if argv and argv[0] == "export":
            return export_main(argv[1:])
        if argv and argv[0] == "export-model":
            return export_model_main(argv[1:])
        if argv and argv[0] == "vision":
            return vision_main(argv[1:])
        if argv and argv[0] == "bench":
            from streamvlm.train.bench import main as bench_main

            return bench_main(argv[1:])
        if argv and argv[0] == "plot":
            from streamvlm.train.plot import main as plot_main

            return plot_main(argv[1:])
        from streamvlm.train.data import VideoDataModule
        from streamvlm.train.loggers import ContinueMetrics
        from streamvlm.train.module import RouterTrainingModule

        # ContinueMetrics joins whatever callbacks the config lists: a resumed run's metrics.csv keeps its rows
        _cli_class()(RouterTrainingModule, VideoDataModule, args=lightning_args, seed_everything_default=0,
                     save_config_kwargs={"overwrite": True}, trainer_defaults={"callbacks": [ContinueMetrics()]})
        return 0
    except StreamVLMError as e:
        print(f"streamvlm-train: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
