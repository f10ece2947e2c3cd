"""The LightningModule that trains routers (optionally with LoRA adapters or the language model), or a
whole model from scratch (trainable="model": vision tower, projector and language model, routing dense).

It wraps the runtime, it does not re-implement it: a sample's frames and exchanges are laid out with the
runtime's `SequenceBuilder` (the same layout a Session feeds), embedded, and run through the runtime's
`Decoder` in one chunk with the learned router choosing tokens per frame at every routed layer, the same
code path as inference.

Losses, on the positions that predict the assistant's tokens (answers and their end-of-turn token):
    distill   KL(dense teacher || routed student); the teacher is the same weights with routing off,
              run under no_grad, so no labels are needed beyond the videos and questions
    lm        next-token cross-entropy against the record's answers
    rank      optional: per frame, KL between the dense teacher's attention that each vision token receives
              from the text after it (the question and answers) and softmax of the router's scores. The
              top-k choice itself has no gradient (only kept tokens' weights do); this gives the scorer a
              direct signal for which tokens later text reads, which is what skipping costs.
    agree     optional: per frame, KL between each routed layer's score distribution and the previous
              routed layer's (detached). Skipping the same tokens at every layer costs far less than
              scattering the skips (measured: random-but-consistent choices are 40% closer to dense than
              independent random choices per layer), and G-Search reports that token rankings agree across
              layers; independent scorers trained only through the kept tokens' weights do not find this.
    z         optional router z-loss, mean of squared router logits (keeps tanh out of saturation)
    dense_lm  optional, when the language model trains (trainable "all" or "router+lora"): the same
              weights run dense on the same sample, cross-entropy against the answers. One set of weights
              then serves both dense and routed: the routed pass teaches the language model to answer from
              the tokens its router keeps, the dense pass keeps it answering from all of them (MoD-style
              models train the language model with routing on: VideoLLM-MoD, p-MoD)

Checkpoints hold only trainable weights (the frozen model is reloaded from `model_dir`).
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import warnings
from dataclasses import asdict
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F

from streamvlm.cache import KVCache
from streamvlm.decoder import Decoder
from streamvlm.errors import StreamVLMError
from streamvlm.flops import FlopCounter
from streamvlm.probe import HiddenRecorder, attention_probs
from streamvlm.routers import DenseRouter, MoDRouter, RoutingConfig, build_router
from streamvlm.runtime import StreamVLM
from streamvlm.sequence import SequenceBuilder, lay_out_dialogue, target_rows
from streamvlm.train.data import Sample, VideoDataModule
from streamvlm.tiny.families import FAMILIES as TINY_FAMILIES
from streamvlm.train.weights import is_language_model_weight

logger = logging.getLogger(__name__)
# The frozen model stays in eval mode on purpose (no dropout); Lightning warns about it at every fit.
warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of training.*")

TRAINABLE = ("router", "router+lora", "all", "model")
LOSSES = ("distill", "lm", "distill+lm")
def write_training_checkpoint(family: str, out_dir: str | Path) -> Path:
    """A small random checkpoint of `family` for CPU runs: 4 decoder layers of width 64 and 16 tokens per
    frame of tokens, so three routed layers have something to choose from."""
    from streamvlm.tiny.families import write_tiny_family

    if family == "llava_onevision":  # its default tiny tower gives 4 tokens per frame: a larger frame
        from streamvlm.tiny import TinySpec, write_tiny_checkpoint

        return write_tiny_checkpoint(out_dir, TinySpec(hidden_size=64, num_layers=4, num_heads=4, num_kv_heads=2,
                                                       intermediate_size=128, image_size=56, patch_size=7))
    return write_tiny_family(out_dir, family, num_layers=4)


def tiny_training_model_dir(family: str = "llava_onevision") -> Path:
    """write_training_checkpoint's checkpoint of `family`, made once in the cache folder."""
    from streamvlm.paths import cache_dir

    if family not in TINY_FAMILIES:
        raise StreamVLMError(f"model.tiny: choose a family among {', '.join(TINY_FAMILIES)} (or true), got {family!r}")
    target = cache_dir() / ("train-tiny" if family == "llava_onevision" else f"train-tiny-{family}")
    if not (target / "config.json").is_file():
        tmp = target.with_name(f".{target.name}-{os.getpid()}")
        write_training_checkpoint(family, tmp)
        try:
            os.replace(tmp, target)
        except OSError:  # another process (a DDP rank) made it first
            if not (target / "config.json").is_file():
                raise
    return target


class RouterTrainingModule(L.LightningModule):
    def __init__(self, model_dir: str | None = None, tiny: bool | str = False, world_model: bool = False,
                 routing: str = "mod:0.2:interleaved",
                 trainable: str = "router", loss: str = "distill", lm_weight: float = 1.0,
                 distill_weight: float = 1.0, rank_weight: float = 0.0, agree_weight: float = 0.0,
                 z_loss_weight: float = 0.0,
                 lr: float = 1e-3,
                 weight_decay: float = 0.0, warmup_steps: int = 0, cosine: bool = False,
                 lora_rank: int = 8, lora_alpha: int = 16, freeze_vision: bool = False,
                 dense_weight: float = 0.0):
        """
        Args:
            model_dir: local Hugging Face checkpoint folder of the model whose router is trained.
            tiny: with no model_dir, make and use a small random checkpoint (for CPU trial runs and tests):
                true for LLaVA-OneVision, or a family name (qwen2_vl, qwen2_5_vl, qwen3_vl, smolvlm).
            world_model: with no model_dir, start from the untrained world model (`streamvlm.train.world_model`).
            routing: the router to train, as --routing takes it ("mod:0.2:interleaved") or a router folder
                to continue from.
            trainable: "router" (default; the model stays frozen), "router+lora" (LoRA on the language
                model's attention projections, needs peft), "all" (router and language model), or
                "model" (every weight of the model, vision tower included, with routing "dense" and
                loss "lm": training a model from scratch).
            loss: "distill" (KL to the dense model), "lm" (cross-entropy on the answers) or "distill+lm".
            lm_weight: weight of the cross-entropy term.
            distill_weight: weight of the distillation term.
            rank_weight: weight of the attention-ranking term (0: off).
            agree_weight: weight of the cross-layer agreement term (0: off).
            z_loss_weight: weight of the router z-loss (0: off).
            lr: AdamW learning rate.
            weight_decay: AdamW weight decay.
            warmup_steps: optimizer steps of linear warm-up from 0 to lr.
            cosine: decay the learning rate to 0 along a cosine over the run's steps (after warm-up).
            lora_rank: LoRA rank for trainable="router+lora".
            lora_alpha: LoRA alpha for trainable="router+lora".
            freeze_vision: with trainable="model", keep the vision tower as it is (after a vision stage,
                `streamvlm-train vision`): the language model's early, noisy gradients otherwise wash out
                what the tower learned there.
            dense_weight: weight of the dense pass's cross-entropy (0: off); needs a trainable language
                model (trainable "all" or "router+lora").
        """
        super().__init__()
        if trainable not in TRAINABLE:
            raise StreamVLMError(f"trainable must be one of {', '.join(TRAINABLE)}, got {trainable!r}")
        if loss not in LOSSES:
            raise StreamVLMError(f"loss must be one of {', '.join(LOSSES)}, got {loss!r}")
        if freeze_vision and trainable != "model":
            raise StreamVLMError("freeze_vision applies to trainable='model' (the other modes never train the tower)")
        if dense_weight < 0:
            raise StreamVLMError(f"dense_weight must be >= 0, got {dense_weight}")
        if dense_weight and trainable not in ("all", "router+lora"):
            raise StreamVLMError("dense_weight trains the language model's dense pass: set trainable to 'all' or "
                                 f"'router+lora' (got {trainable!r})")
        if trainable == "model" and (loss != "lm" or routing != "dense"):
            raise StreamVLMError("trainable='model' trains a model from its labels: set loss: lm and routing: dense")
        if model_dir is None:
            if world_model:
                from streamvlm.train.world_model import initial_model_dir

                model_dir = str(initial_model_dir())
            elif tiny:
                model_dir = str(tiny_training_model_dir("llava_onevision" if tiny is True else tiny))
            else:
                raise StreamVLMError("set model.model_dir to a checkpoint folder (or model.tiny: true for a trial)")
        self.save_hyperparameters()
        self.hparams.model_dir = model_dir
        # Frozen weights are loaded in float32; Lightning's precision flag (bf16-mixed) casts compute.
        vlm = StreamVLM.from_pretrained(model_dir, routing=routing, device="cpu", dtype=torch.float32)
        learned = any(True for _ in vlm.router.parameters())
        if trainable == "router" and not learned:
            # A training-free policy (skip, layer_drop, fastv, ...) trains the model to work under it: the
            # language model (or LoRA on it) learns with the policy in the loop, as Skipping Computations
            # fine-tunes with its skips.
            raise StreamVLMError(f"routing {routing!r} has no weights of its own to train; train the language "
                                 "model under it with trainable: router+lora or all, or use a learned policy "
                                 "such as mod:0.2")
        if (rank_weight or agree_weight or z_loss_weight) and not isinstance(vlm.router, MoDRouter):
            raise StreamVLMError("rank_weight, agree_weight and z_loss_weight train a MoD router's scorers; "
                                 f"routing {routing!r} has none")
        self.vlm = vlm
        self.model = vlm.adapter.model  # registered, so Lightning moves it to the device
        self.router = vlm.router
        self.model.requires_grad_(False)
        if trainable == "router+lora":
            self._add_lora(lora_rank, lora_alpha)
        elif trainable == "all":
            vlm.adapter.language_model().requires_grad_(True)
            vlm.adapter.lm_head().requires_grad_(True)
        elif trainable == "model":
            self.model.requires_grad_(True)
            if freeze_vision:
                vlm.adapter.vision_tower().requires_grad_(False)
        self.router.requires_grad_(True)
        # Lightning keeps each module's train/eval mode as it finds it: the frozen model stays in eval
        # mode (no dropout), the router trains.
        self.router.train()
        parts = vlm.adapter.decoder
        self.student = Decoder(parts, self.router)
        self.dense_student = Decoder(parts, DenseRouter())  # the same weights, routing off (dense_weight)
        self.teacher = Decoder(self._teacher_parts(trainable), DenseRouter())
        self.stop_ids = set(vlm.adapter.stop_token_ids)
        self.strict_loading = False  # checkpoints hold only the trainable weights

    def _add_lora(self, rank: int, alpha: int) -> None:
        try:
            from peft import LoraConfig, inject_adapter_in_model
        except ImportError:
            raise StreamVLMError("trainable='router+lora' needs peft: pip install 'streamvlm[train]'") from None
        config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
        # Only the language model's projections: the vision tower stays frozen and untouched.
        inject_adapter_in_model(config, self.vlm.adapter.language_model())
        for name, p in self.model.named_parameters():
            p.requires_grad_("lora_" in name)
        # peft swapped the projection modules for LoRA ones: read the decoder's parts again.
        self.vlm.adapter.decoder = self.vlm.adapter.decoder_parts(self.model)

    def _teacher_parts(self, trainable: str):
        """The dense teacher runs the original weights: shared when they are frozen ("router"), a frozen
        copy when the language model itself trains ("all"); with LoRA, adapters are switched off for it."""
        if trainable != "all":
            return self.vlm.adapter.decoder
        import copy

        self._teacher_model = [copy.deepcopy(self.model).requires_grad_(False)]  # a list: not a submodule
        return self.vlm.adapter.decoder_parts(self._teacher_model[0])

    def _lora_layers(self):
        return [m for m in self.model.modules() if hasattr(m, "enable_adapters") and hasattr(m, "lora_A")]

    # -- building a sample's sequence ------------------------------------------------------------

    @property
    def _tower_trains(self) -> bool:
        return self.hparams.trainable == "model" and not self.hparams.freeze_vision

    def _runs(self, sample: Sample) -> tuple[list[int], dict[int, int]]:
        """How a sample's frames are encoded: the input frames in encoding order, and the first row of each
        run's frames of tokens (by the run's first frame). Frames fold in frames_per_step groups within a run
        (Qwen-VL pairs); a run short of a whole group repeats its last frame, as a session pads a frame whose
        pair never came. With one frame per step this is every frame in order."""
        step = self.vlm.adapter.frames_per_step
        order, first_row = [], {}
        for event in sample.events:
            if hasattr(event, "start") and event.end > event.start:
                first_row[event.start] = len(order) // step
                order += list(range(event.start, event.end)) + [event.end - 1] * (-(event.end - event.start) % step)
        return order, first_row

    def _features(self, sample: Sample, order: list[int]) -> torch.Tensor:
        """Frames of tokens (rows, tokens_per_frame, feature_dim) of the input frames `order` (a whole number
        of groups per run). While the vision tower is frozen its output (`tower_features`) comes from the
        feature cache when present, and the rest of the encoder (the projector, `project_features`) runs on
        it, with gradients when it trains (trainable "model")."""
        adapter = self.vlm.adapter

        def pixels() -> torch.Tensor:
            p = sample.pixels
            if order != list(range(p.shape[0])):
                p = p[torch.tensor(order)]
            return p.to(self.device, adapter.dtype)

        if not order:
            return torch.empty(0, adapter.vision.tokens_per_frame, adapter.feature_dim, device=self.device)
        if self._tower_trains:  # no cache, gradients flow through the tower
            return adapter.frame_features(pixels())
        path = sample.feature_path
        if path and os.path.exists(path):
            tower = torch.load(path, map_location=self.device, weights_only=True).to(adapter.dtype)
        else:
            with torch.no_grad():
                tower = adapter.tower_features(pixels())
            if path:
                tmp = f"{path}.{os.getpid()}.tmp"
                torch.save(tower.detach().cpu(), tmp)
                os.replace(tmp, path)  # a reader never sees half a file
        with torch.set_grad_enabled(self.hparams.trainable == "model" and torch.is_grad_enabled()):
            return adapter.project_features(tower)

    def sequence(self, sample: Sample):
        """The sample as one Chunk, laid out by the runtime's SequenceBuilder (what a session feeds), plus
        (target rows, target ids): logits row r predicts token ids[r]."""
        order, first_row = self._runs(sample)
        features = self._features(sample, order)
        step = self.vlm.adapter.frames_per_step

        def encoded(start: int, end: int) -> torch.Tensor:
            """The frames of tokens of the run of input frames start..end-1."""
            first = first_row[start]
            return features[first:first + math.ceil((end - start) / step)]

        builder = SequenceBuilder(self.vlm.adapter, trace=False)
        pieces = lay_out_dialogue(builder, sample.events, sample.timestamps.tolist(), encoded, self.stop_ids)
        rows, targets = target_rows(pieces, builder)
        if not rows:
            raise StreamVLMError(f"sample {sample.id} has no answer tokens to train on")
        return builder.place(pieces), torch.tensor(rows, device=self.device), torch.tensor(targets, device=self.device)

    def _run(self, decoder: Decoder, chunk) -> torch.Tensor:
        parts = self.vlm.adapter.decoder
        cache = KVCache(parts.num_layers, parts.num_kv_heads, parts.head_dim, chunk.embeds.dtype, self.device)
        return decoder.forward(chunk, cache, FlopCounter.for_decoder(parts), logits="all")

    # -- losses ----------------------------------------------------------------------------------

    def losses(self, sample: Sample) -> dict[str, torch.Tensor]:
        chunk, rows, targets = self.sequence(sample)
        hp = self.hparams
        if isinstance(self.router, MoDRouter):
            self.router.recorded.clear()
        student = self._run(self.student, chunk)[rows].float()  # (R, vocab)
        out = {"acc": (student.detach().argmax(-1) == targets).float().mean()}
        if "distill" in hp.loss or hp.rank_weight:
            teacher_logits, teacher_cache, hidden = self._teacher(chunk)
        if "distill" in hp.loss:
            teacher = teacher_logits[rows].float()
            out["distill"] = F.kl_div(student.log_softmax(-1), teacher.log_softmax(-1), log_target=True,
                                      reduction="batchmean")
        if "lm" in hp.loss:
            out["lm"] = F.cross_entropy(student, targets)
        loss = hp.distill_weight * out.get("distill", 0.0) + hp.lm_weight * out.get("lm", 0.0)
        recorded = getattr(self.router, "recorded", {})
        if hp.dense_weight:
            dense = self._run(self.dense_student, chunk)[rows].float()
            out["dense_acc"] = (dense.detach().argmax(-1) == targets).float().mean()
            out["dense_lm"] = F.cross_entropy(dense, targets)
            loss = loss + hp.dense_weight * out["dense_lm"]
        if hp.rank_weight and recorded:
            out["rank"] = self._rank_loss(chunk, teacher_cache, hidden)
            loss = loss + hp.rank_weight * out["rank"]
        if hp.agree_weight and len(recorded) > 1:
            out["agree"] = self._agree_loss()
            loss = loss + hp.agree_weight * out["agree"]
        if hp.z_loss_weight and recorded:
            out["z"] = torch.stack([s.pow(2).mean() for s in self.router.recorded.values()]).mean()
            loss = loss + hp.z_loss_weight * out["z"]
        out["loss"] = loss
        return out

    def _agree_loss(self) -> torch.Tensor:
        """Mean over consecutive routed layers of KL(softmax(previous scores) || softmax(scores)), per frame."""
        layers = sorted(self.router.recorded)
        terms = [F.kl_div(self.router.recorded[b].float().log_softmax(-1),
                          self.router.recorded[a].detach().float().log_softmax(-1), log_target=True,
                          reduction="batchmean") for a, b in zip(layers, layers[1:])]
        return torch.stack(terms).mean()

    @torch.no_grad()
    def _teacher(self, chunk):
        """Dense forward with the original weights: logits, its cache, and each routed layer's input."""
        lora = self._lora_layers()
        recorder = HiddenRecorder(map(int, getattr(self.router, "scorers", {})))
        parts = self.teacher.parts
        cache = KVCache(parts.num_layers, parts.num_kv_heads, parts.head_dim, chunk.embeds.dtype, self.device)
        for m in lora:
            m.enable_adapters(False)
        try:
            logits = Decoder(parts, recorder).forward(chunk, cache, FlopCounter.for_decoder(parts), logits="all")
        finally:
            for m in lora:
                m.enable_adapters(True)
        return logits, cache, recorder.hidden

    def _rank_loss(self, chunk, cache: KVCache, hidden: dict[int, torch.Tensor]) -> torch.Tensor:
        """Mean over routed layers and frames of KL(teacher attention received || softmax(router scores))."""
        parts = self.teacher.parts
        vision = chunk.vision_index  # (F, T)
        last_frame_end = int(vision[-1, -1]) + 1
        queries = torch.nonzero(chunk.text_mask[last_frame_end:]).squeeze(1) + last_frame_end
        terms = []
        for layer, scores in self.router.recorded.items():
            # Softmax over all keys a query sees would need the whole cache; the ranking inside the
            # frames only needs attention among vision keys, which this is (frames precede every query).
            probs = attention_probs(parts, layer, hidden[layer][queries], chunk.rope_ids(queries[None]),
                                    cache.keys(layer)[:, vision.flatten()])  # (H, Q, F*T)
            received = probs.mean(dim=(0, 1)).view(vision.shape)  # (F, T)
            target = received / received.sum(-1, keepdim=True)
            terms.append(F.kl_div(scores.float().log_softmax(-1), target.log(), log_target=True,
                                  reduction="batchmean"))
        return torch.stack(terms).mean()

    def _step(self, batch: list[Sample], stage: str) -> torch.Tensor | None:
        if not batch:  # every sample of the batch failed to decode (counted by the data module)
            return None
        totals: dict[str, torch.Tensor] = {}
        for sample in batch:
            for key, value in self.losses(sample).items():
                totals[key] = totals.get(key, 0.0) + value / len(batch)
        for key, value in totals.items():
            self.log(f"{stage}/{key}", value, prog_bar=key == "loss", batch_size=len(batch),
                     sync_dist=stage != "train")
        return totals["loss"]

    def setup(self, stage: str) -> None:
        # DDP ranks on one CPU machine share its cores: without this each rank starts a thread per core
        # and they oversubscribe. Measured on 2 cores: 2 ranks x 1 thread run ~1.4x the samples/s of one
        # process with 2 threads (the small model's steps are bound by per-op overhead, not by matmuls).
        if self.device.type == "cpu" and self.trainer.world_size > 1:
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // self.trainer.world_size))
        data = getattr(self.trainer, "datamodule", None)
        if isinstance(data, VideoDataModule) and data.feature_cache and not self._tower_trains:
            data.set_encoder(self.encoder_fingerprint())

    def encoder_fingerprint(self) -> str:
        """A hash of the weights whose output the feature cache keeps (`tower_features`: the vision tower
        of a family that splits its encoder, else every weight outside the language model), part of the
        cache's key: features a retrained tower would encode differently are not reused."""
        prefix = self.vlm.adapter.tower_prefix
        digest = hashlib.sha1(b"tower" if prefix else b"encoder")
        for name, tensor in sorted(self.model.state_dict().items()):
            encodes = name.startswith(prefix) if prefix else not is_language_model_weight(name)
            if not encodes:
                continue
            digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
            digest.update(tensor.detach().reshape(-1).contiguous().view(torch.uint8).cpu().numpy().tobytes())
        return digest.hexdigest()[:16]

    def on_fit_start(self) -> None:
        if hasattr(self, "_teacher_model"):
            self._teacher_model[0].to(self.device)

    def training_step(self, batch, batch_idx):
        return self._step(batch, "train")

    def validation_step(self, batch, batch_idx):
        self._step(batch, "val")

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        warmup, cosine = self.hparams.warmup_steps, self.hparams.cosine
        if not warmup and not cosine:
            return optimizer
        total = max(int(self.trainer.estimated_stepping_batches), warmup + 1) if cosine else None

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            if total is None:
                return 1.0
            return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / (total - warmup))))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # -- checkpoints -----------------------------------------------------------------------------

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        trainable = {name for name, p in self.named_parameters() if p.requires_grad}
        if self.hparams.trainable == "model":  # the whole model, frozen tower included: export needs it all
            trainable |= {name for name, _ in self.named_parameters() if name.startswith("model.")}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}
        parts = self.vlm.adapter.decoder
        routing = self.router.config.to_dict() if isinstance(self.router, MoDRouter) else None
        # A training-free policy's whole config: a calibrated one (head_prune, yopo) holds a mask its spec lacks.
        config = getattr(self.router, "config", None)
        policy = None if routing is not None or config is None else (
            config.to_dict() if hasattr(config, "to_dict") else asdict(config))
        checkpoint["streamvlm"] = {"routing": routing, "policy": policy, "num_layers": parts.num_layers,
                                   "trainable": self.hparams.trainable,
                                   "hidden_size": parts.hidden_size, "model_dir": str(self.hparams.model_dir),
                                   "family": self.vlm.adapter.family, "spec": self.router.spec(),
                                   "lora": ({"rank": self.hparams.lora_rank, "alpha": self.hparams.lora_alpha}
                                            if self.hparams.trainable == "router+lora" else None)}


def export_router(checkpoint_path: str | Path, out_dir: str | Path) -> Path:
    """Write the router of a training checkpoint as a router folder the runtime loads."""
    from streamvlm.routers import save_router

    try:
        ckpt = torch.load(checkpoint_path, map_location="cpu", weights_only=False)
    except (OSError, RuntimeError) as e:
        raise StreamVLMError(f"cannot read checkpoint {checkpoint_path}: {e}") from None
    meta = ckpt.get("streamvlm")
    if meta is None:
        raise StreamVLMError(f"{checkpoint_path} is not a streamvlm training checkpoint")
    if meta.get("routing") is None:
        if meta.get("spec") not in (None, "dense"):
            raise StreamVLMError(f"{checkpoint_path} trained the language model under {meta['spec']} (a policy with "
                                 "no weights of its own); export it with `streamvlm-train export-model CKPT OUT`, "
                                 "which writes the model and the policy as OUT/router")
        raise StreamVLMError(f"{checkpoint_path} trained a whole model, not a router; export it with "
                             "`streamvlm-train export-model`")
    config = RoutingConfig.from_dict(meta["routing"])
    router = build_router(config, meta["num_layers"], meta["hidden_size"])
    prefix = "router."
    state = {k[len(prefix):]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
    router.load_state_dict(state)
    return save_router(router, out_dir)
