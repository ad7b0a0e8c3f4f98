"""Mixed precision (SOLVER.AMP / TEST.AMP, detr_d2/engine/precision.py, amp_trainer.py): the
switches, the dtype each part runs in, non-finite handling, resume and checkpoints across
precisions. Tiny models on the CPU; the CUDA paths are skipped without a GPU.

The float16 + GradScaler path (CUDA's default) is exercised on the CPU through
``DetrAMPTrainer`` directly (the config refuses float16 training on the CPU) with the
backbone frozen (FROZEN): torch's float16 convolution backward on the CPU takes seconds
even for the tiny model."""
import logging

import pytest
import torch
from detectron2.utils.events import EventStorage

from detr_d2.engine import AtomicDetectionCheckpointer, NonFiniteValuesError, SetupError, Trainer, build_config
from detr_d2.engine import precision
from detr_d2.engine.amp_trainer import DetrAMPTrainer
from detr_d2.engine.finite_checks import DetrSimpleTrainer, install_output_check
from tests.helpers import (
    TINY_CONFIG,
    assert_succeeded,
    run_one,
    tiny_cfg,
    tiny_model,
    train_net,
    training_input,
)

BF16, FP16 = torch.bfloat16, torch.float16
FROZEN = ("MODEL.BACKBONE.FREEZE_AT", 5)
NEEDS_CUDA = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a CUDA device (float16 autocast with torch.amp.GradScaler('cuda'))")


def fixed_batches(count, seed=0):
    """``count`` training batches of two images with boxes, the same for every caller."""
    torch.manual_seed(seed)
    return [[training_input(64, 80, [[5, 5, 40, 40], [30, 10, 70, 60]], [0, 1]),
             training_input(64, 64, [[2, 3, 50, 40]], [2])] for _ in range(count)]


def amp_trainer(model, batches, dtype, cfg=None):
    cfg = cfg or tiny_cfg(*FROZEN)
    optimizer = Trainer.build_optimizer(cfg, model)
    return DetrAMPTrainer(model.train(), iter(batches), optimizer, "cpu", dtype)


def run_steps(trainer, count):
    for _ in range(count):
        with EventStorage(trainer.iter):
            trainer.run_step()
        trainer.iter += 1


# ---------------------------------------------------------------- switches
def test_precision_defaults_to_bfloat16_on_the_cpu_and_float16_on_cuda():
    assert precision.autocast_dtype("", "cpu") == BF16
    assert precision.autocast_dtype("", "cuda:0") == FP16
    assert precision.autocast_dtype("float16", "cpu") == FP16
    assert precision.autocast_dtype("bfloat16", "cuda") == BF16
    cfg = tiny_cfg()
    assert cfg.SOLVER.AMP.PRECISION == "" and cfg.TEST.AMP.ENABLED is False
    assert precision.training_dtype(cfg) is None and precision.inference_dtype(cfg) is None
    on = tiny_cfg("SOLVER.AMP.ENABLED", True, "TEST.AMP.ENABLED", True)
    assert precision.training_dtype(on) == BF16 and precision.inference_dtype(on) == BF16
    assert precision.needs_grad_scaler(FP16) and not precision.needs_grad_scaler(BF16)


def test_float16_training_on_the_cpu_is_refused_but_float16_inference_is_not():
    with pytest.raises(SetupError, match="SOLVER.AMP.PRECISION 'float16' on MODEL.DEVICE 'cpu'.*'bfloat16'"):
        precision.check_precision(tiny_cfg("SOLVER.AMP.ENABLED", True, "SOLVER.AMP.PRECISION", "float16"))
    precision.check_precision(tiny_cfg("TEST.AMP.ENABLED", True, "SOLVER.AMP.PRECISION", "float16"))


@pytest.mark.parametrize("opts, named", [
    (("SOLVER.AMP.PRECISION", "fp8"), "SOLVER.AMP.PRECISION"),
    (("TEST.AMP.ENABLED", "yes"), "TEST.AMP.ENABLED"),
])
def test_bad_amp_values_are_named_when_the_config_is_built(opts, named):
    with pytest.raises(SetupError, match=named):
        build_config(str(TINY_CONFIG), list(opts))


def test_the_step_trainer_follows_solver_amp(tmp_path):
    model = tiny_model()
    optimizer = Trainer.build_optimizer(tiny_cfg(), model)
    plain = Trainer.build_step_trainer(tiny_cfg(), model, [], optimizer)
    assert type(plain) is DetrSimpleTrainer
    bf16 = Trainer.build_step_trainer(tiny_cfg("SOLVER.AMP.ENABLED", True), model, [], optimizer)
    assert isinstance(bf16, DetrAMPTrainer) and bf16.dtype == BF16 and not bf16.grad_scaler.is_enabled()
    fp16 = Trainer.build_step_trainer(tiny_cfg("SOLVER.AMP.ENABLED", True, "SOLVER.AMP.PRECISION", "float16"),
                                      model, [], optimizer)
    assert fp16.dtype == FP16 and fp16.grad_scaler.is_enabled()


def test_emulated_cpu_precision_is_warned_once(monkeypatch, caplog):
    monkeypatch.setattr(precision, "_cpu_flags", lambda: frozenset({"avx2", "fma"}))
    precision.warn_if_emulated.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger=precision.logger.name):
            for _ in range(3):
                precision.check_precision(tiny_cfg("SOLVER.AMP.ENABLED", True))
        warnings = [r.getMessage() for r in caplog.records if "emulated" in r.getMessage()]
        assert len(warnings) == 1 and "bfloat16" in warnings[0] and "avx512_bf16" in warnings[0]
    finally:
        precision.warn_if_emulated.cache_clear()


def test_native_cpu_support_is_read_from_the_cpu_flags(monkeypatch):
    monkeypatch.setattr(precision, "_cpu_flags", lambda: frozenset({"avx512f", "avx512_bf16"}))
    assert precision.native_cpu_support(BF16) and not precision.native_cpu_support(FP16)


# ---------------------------------------------------------------- dtypes of the parts
class DtypeRecorder:
    """Output dtypes of every module of the given types, by module name (forward hooks)."""

    def __init__(self, model, types):
        self.dtypes = {}
        for name, module in model.named_modules():
            if isinstance(module, types):
                module.register_forward_hook(self._hook(name))

    def _hook(self, name):
        def record(module, inputs, output):
            output = output[0] if isinstance(output, tuple) else output
            if torch.is_tensor(output):
                self.dtypes[name] = output.dtype
        return record


def test_training_under_bf16_runs_convs_and_matmuls_in_bf16_and_losses_and_matching_in_fp32():
    model = tiny_model()
    layers = DtypeRecorder(model, (torch.nn.Conv2d, torch.nn.Linear, torch.nn.MultiheadAttention))
    matcher_inputs = []
    model.criterion.matcher.register_forward_pre_hook(
        lambda module, args: matcher_inputs.append((args[0].dtype, args[1].dtype)))
    losses = []
    trainer = amp_trainer(model, fixed_batches(1), BF16)
    trainer._write_metrics = lambda loss_dict, *rest: losses.append(loss_dict)
    run_steps(trainer, 1)
    backbone_convs = {n: d for n, d in layers.dtypes.items() if n.startswith("backbone.") and "res3" in n}
    attention = {n: d for n, d in layers.dtypes.items() if n.startswith("transformer.")}
    assert backbone_convs and set(backbone_convs.values()) == {BF16}
    assert attention and set(attention.values()) == {BF16}
    assert layers.dtypes["input_proj"] == BF16
    assert layers.dtypes["class_embed"] == torch.float32 == layers.dtypes["bbox_embed.layers.2"]  # fp32 heads
    assert matcher_inputs == [(torch.float32, torch.float32)]
    assert {v.dtype for v in losses[0].values()} == {torch.float32}
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    state = trainer.optimizer.state_dict()["state"]
    assert {t.dtype for s in state.values() for t in s.values() if t.is_floating_point() and t.dim()} == {torch.float32}


def test_inference_under_bf16_gives_float32_results_close_to_float32():
    model = tiny_model().eval()
    layers = DtypeRecorder(model, (torch.nn.Linear,))
    images = [{"image": b["image"]} for b in fixed_batches(1)[0]]
    with torch.no_grad():
        reference = model(images)
        with precision.inference_autocast(tiny_cfg("TEST.AMP.ENABLED", True)):
            results = model(images)
    assert layers.dtypes["transformer.decoder.layers.0.linear2"] == BF16
    assert layers.dtypes["class_embed"] == torch.float32
    for ref, out in zip(reference, results):
        a, b = ref["instances"], out["instances"]
        assert b.scores.dtype == torch.float32 and b.pred_boxes.tensor.dtype == torch.float32
        assert (a.scores - b.scores).abs().max() < 0.02
        assert (a.pred_boxes.tensor - b.pred_boxes.tensor).abs().max() < 0.02 * 80


def test_trainer_test_evaluates_under_test_amp(datasets_root, tmp_path):
    coco = datasets_root / "coco"
    register = (("amp_val", str(coco / "annotations" / "instances_val2017.json"), str(coco / "val2017")),)
    opts = ["OUTPUT_DIR", str(tmp_path), "TEST.EVAL_LOSSES", "True", "DATASETS.REGISTER_COCO", repr(register),
            "DATASETS.TEST", "('amp_val',)"]
    model = tiny_model().eval()
    seen = []
    model.input_proj.register_forward_hook(lambda module, inputs, output: seen.append(output.dtype))
    for amp, expected in (("False", torch.float32), ("True", BF16)):
        cfg = build_config(str(TINY_CONFIG), [*opts, "TEST.AMP.ENABLED", amp])
        seen.clear()
        results = Trainer.test(cfg, model)
        assert set(seen) == {expected}
        assert "bbox" in results and "loss" in results["val"]
        assert torch.isfinite(torch.tensor(results["val"]["loss"]))


# ---------------------------------------------------------------- non-finite values
def test_nan_weights_under_bf16_stop_with_the_float32_message():
    model = tiny_model()
    install_output_check(model)
    with torch.no_grad():
        model.class_embed.weight[0, 0] = float("nan")
    trainer = amp_trainer(model, fixed_batches(1), BF16)
    with pytest.raises(NonFiniteValuesError, match=r"iteration 0: non-finite loss terms loss_ce.*predictions hold"):
        run_steps(trainer, 1)


def test_float16_overflow_stops_with_the_same_message():
    """1e5 fits float32 and bfloat16 but not float16 (max 65504): the float16 input projection
    overflows, and the predictions after it are NaN."""
    model = tiny_model(*FROZEN)
    install_output_check(model)
    with torch.no_grad():
        model.input_proj.bias[0] = 1e5
    run_steps(amp_trainer(model, fixed_batches(1), BF16), 1)  # bf16: finite
    trainer = amp_trainer(model, fixed_batches(1), FP16)
    with pytest.raises(NonFiniteValuesError, match=r"non-finite loss terms loss_ce"):
        run_steps(trainer, 1)


def test_float16_steps_skipped_by_the_grad_scaler_are_not_errors():
    """A loss scale so large that the float16 backward overflows: the scaler skips the step
    (weights unchanged), halves the scale, and training goes on."""
    model = tiny_model(*FROZEN)
    trainer = amp_trainer(model, fixed_batches(2), FP16)
    trainer.grad_scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 100)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    run_steps(trainer, 1)
    assert trainer.grad_scaler.get_scale() == 2.0 ** 99
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    run_steps(trainer, 1)


# ---------------------------------------------------------------- resume, checkpoints
def save_run(model, trainer, folder, name):
    checkpointer = AtomicDetectionCheckpointer(model, str(folder))
    checkpointer.save(name, _trainer=trainer.state_dict(), iteration=trainer.iter - 1)
    return folder / f"{name}.pth"


@pytest.mark.parametrize("dtype", [BF16, FP16])
def test_resume_continues_an_amp_run_exactly(tmp_path, dtype):
    batches = fixed_batches(4)
    straight = tiny_model(*FROZEN)
    run_steps(amp_trainer(straight, batches, dtype), 4)

    first = tiny_model(*FROZEN)
    first_trainer = amp_trainer(first, batches[:2], dtype)
    run_steps(first_trainer, 2)
    path = save_run(first, first_trainer, tmp_path, "model_0000001")

    resumed = tiny_model(*FROZEN)
    with torch.no_grad():
        for p in resumed.parameters():
            p.add_(1.0)  # everything must come from the checkpoint
    trainer = amp_trainer(resumed, batches[2:], dtype)
    extra = AtomicDetectionCheckpointer(resumed, str(tmp_path)).load(str(path))
    trainer.load_state_dict(extra["_trainer"])
    assert trainer.grad_scaler.state_dict() == first_trainer.grad_scaler.state_dict()
    if dtype == FP16:
        assert trainer.grad_scaler.is_enabled() and extra["_trainer"]["grad_scaler"]["scale"] > 0
    run_steps(trainer, 2)
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def test_checkpoints_cross_between_float32_and_amp(tmp_path):
    batches = fixed_batches(2)
    amp_model = tiny_model(*FROZEN)
    amp = amp_trainer(amp_model, batches[:1], FP16)
    run_steps(amp, 1)
    amp_path = save_run(amp_model, amp, tmp_path, "amp")

    # an AMP checkpoint resumed in float32: the same float32 weights, the optimizer state, training goes on
    fp32_model = tiny_model(*FROZEN)
    fp32 = DetrSimpleTrainer(fp32_model.train(), iter(batches[1:]),
                             Trainer.build_optimizer(tiny_cfg(*FROZEN), fp32_model))
    extra = AtomicDetectionCheckpointer(fp32_model, str(tmp_path)).load(str(amp_path))
    fp32.load_state_dict(extra["_trainer"])
    assert all(torch.equal(a, b) for a, b in zip(amp_model.state_dict().values(), fp32_model.state_dict().values()))
    assert {v.dtype for v in fp32_model.state_dict().values() if v.is_floating_point()} == {torch.float32}
    fp32.iter = 1
    run_steps(fp32, 1)
    fp32_path = save_run(fp32_model, fp32, tmp_path, "fp32")

    # a float32 checkpoint resumed in float16: the weights, a new loss scale
    fp16_model = tiny_model(*FROZEN)
    fp16 = amp_trainer(fp16_model, batches[:1], FP16)
    extra = AtomicDetectionCheckpointer(fp16_model, str(tmp_path)).load(str(fp32_path))
    assert "grad_scaler" not in extra["_trainer"]
    fp16.load_state_dict(extra["_trainer"])
    assert fp16.grad_scaler.get_scale() == torch.amp.GradScaler("cpu").get_scale()
    assert all(torch.equal(a, b) for a, b in zip(fp32_model.state_dict().values(), fp16_model.state_dict().values()))
    run_steps(fp16, 1)


@pytest.mark.slow
def test_train_net_trains_resumes_and_evaluates_in_bf16(datasets_root, tmp_path):
    """The command lines: an AMP run checkpoints at iteration 2, --resume continues it to the
    end, --eval-only with TEST.AMP.ENABLED evaluates the result (the trainings evaluate
    nothing: DATASETS.TEST empty)."""
    out = tmp_path / "out"
    opts = ["OUTPUT_DIR", out, "SOLVER.AMP.ENABLED", "True", "SOLVER.CHECKPOINT_PERIOD", "3", "DATASETS.TEST", "()",
            *FROZEN]
    assert_succeeded(run_one(train_net(*opts, "SOLVER.MAX_ITER", "3"), datasets_root))
    checkpoint = torch.load(out / "model_final.pth", weights_only=False)
    assert checkpoint["iteration"] == 2 and checkpoint["trainer"]["_trainer"]["grad_scaler"] == {}  # bf16: no scaler
    assert {v.dtype for v in checkpoint["model"].values() if v.is_floating_point()} == {torch.float32}
    assert_succeeded(run_one(train_net("--resume", *opts, "SOLVER.MAX_ITER", "5"), datasets_root))
    assert "Starting training from iteration 3" in (out / "log.txt").read_text()
    evaluation = run_one(train_net("--eval-only", "OUTPUT_DIR", out, "MODEL.WEIGHTS", out / "model_final.pth",
                                   "TEST.AMP.ENABLED", "True"), datasets_root)
    assert_succeeded(evaluation)
    assert "Evaluation results for bbox" in evaluation.output


# ---------------------------------------------------------------- CUDA
@NEEDS_CUDA
@pytest.mark.parametrize("precision_name, scaled", [("", True), ("bfloat16", False)])
def test_cuda_training_step(precision_name, scaled):
    cfg = tiny_cfg("MODEL.DEVICE", "cuda", "SOLVER.AMP.ENABLED", True, "SOLVER.AMP.PRECISION", precision_name)
    if precision_name == "bfloat16" and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bfloat16")
    torch.manual_seed(0)
    from detr_d2.engine.build import build_model
    model = build_model(cfg)
    trainer = Trainer.build_step_trainer(cfg, model, iter(fixed_batches(2)), Trainer.build_optimizer(cfg, model))
    assert trainer.grad_scaler.is_enabled() == scaled
    run_steps(trainer, 2)
    assert all(torch.isfinite(p).all() for p in model.parameters())
