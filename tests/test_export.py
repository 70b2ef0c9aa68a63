"""export.py end to end, and the deployment backends of utils.infer.backends.

One tiny run (resnet10t, one epoch at 32 px on 3 colour classes) is trained with main.py, then
exported with export.py in subprocesses, the way a user runs them: TorchScript + ONNX + int8 ONNX
+ OpenVINO with a dynamic batch, and a RepVGG checkpoint (random weights and batch-norm
statistics, so its branches differ) to ONNX (onnxslim) and OpenVINO with a fixed batch. Each exported file is then
run through utils.infer.backends -- in a fresh process without timm for the deployment path -- and
compared with PyTorch on real images.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from conftest import (REPO, SUBPROCESS_ENV, assert_ok, assert_user_error, class_image, describe, run_inprocess, run_many,
                      run_script, train_args)

CLASSES = ["red", "green", "blue"]
SPLITS = {"train": 16, "val": 6, "test": 8}
FP32_TOLERANCE = 1e-4


# ---------------------------------------------------------------------------------- fixtures
def write_dataset(root: Path) -> Path:
    """root/<split>/<class>/img<k>.png: 32x32 images, each class its own colour."""
    for k, (split, n) in enumerate(SPLITS.items()):
        rng = np.random.default_rng(100 + k)
        for c, name in enumerate(CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                class_image(c, rng, size=32).save(folder / f"img{i}.png")
    return root


def random_repvgg_checkpoint(resnet_run: Path, out: Path) -> Path:
    """A RepVGG-A0 checkpoint of this toolkit with random weights, batch-norm scales and shifts,
    and batch-norm statistics measured on random inputs (so the 3x3, 1x1 and identity branches of
    every block differ and the outputs depend on the image), sharing the resnet run's classes,
    preprocessing and data paths. Faster than training, and less degenerate than one epoch."""
    import dataclasses

    from utils.core.checkpoint import load_checkpoint
    from utils.core.run import Run
    from utils.models.registry import create_model

    ckpt = load_checkpoint(resnet_run / "best.pt")
    torch.manual_seed(0)
    model = create_model("RepVGG-A0", ckpt.meta.num_classes, 3)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
                module.momentum = None  # cumulative statistics over the calibration pass
                module.reset_running_stats()
        model.train()(torch.randn(16, 3, 32, 32))
    out.mkdir(parents=True)
    ckpt.meta = dataclasses.replace(ckpt.meta, model_name="RepVGG-A0")
    ckpt.model = model.state_dict()
    Run(out).save("best.pt", ckpt)
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The dataset, the trained resnet10t run and the RepVGG run folder."""
    root = tmp_path_factory.mktemp("export")
    data = write_dataset(root / "data")
    resnet = root / "runs" / "resnet"
    assert_ok(run_script("main.py", *train_args(data, resnet)))
    return {"data": data, "resnet": resnet, "repvgg": random_repvgg_checkpoint(resnet, root / "runs" / "repvgg"),
            "root": root}


@pytest.fixture(scope="module")
def exported(runs: dict[str, Path]) -> dict[str, Any]:
    """export.py runs, two at a time: the resnet run in every CPU format with int8, the RepVGG run
    at a fixed batch (ONNX with --simplify, OpenVINO), and the requests that must fail before any work."""
    jobs = {
        "resnet": ["--save_path", runs["resnet"], "--export", "torchscript", "onnx", "openvino", "--int8", "--device", "cpu"],
        "repvgg": ["--save_path", runs["repvgg"], "--export", "onnx", "openvino", "--batch_size", "2", "--simplify",
                   "--device", "cpu"],
    }
    procs = run_many([{"script": "export.py", "args": [str(a) for a in args]} for args in jobs.values()])
    return dict(zip(jobs, procs)) | {  # start-up errors: in this process
        "tensorrt": run_inprocess("export.py", "--save_path", runs["resnet"], "--export", "tensorrt", "--output_path", runs["root"] / "trt"),
        "half": run_inprocess("export.py", "--save_path", runs["resnet"], "--export", "onnx", "--half", "--device", "cpu",
                              "--output_path", runs["root"] / "half"),
    }


def split_images(runs: dict[str, Path], split: str = "test") -> torch.Tensor:
    """The uint8 batch of a split, preprocessed as the run says."""
    from utils.data.decode import load_image
    from utils.infer.backends import load_backend, preprocess_images

    meta = load_backend(runs["resnet"]).meta
    files = sorted((runs["data"] / split).rglob("*.png"))
    return torch.from_numpy(preprocess_images(meta, [load_image(f) for f in files]))  # numpy -> torch: torch comes back


def probs_of(path: Path, model_type: str, images: torch.Tensor) -> torch.Tensor:
    from utils.infer.backends import load_backend, predict_probs

    return predict_probs(load_backend(path, model_type, "cpu"), images)


# ------------------------------------------------------------------------------------ export
def test_export_writes_every_format_with_metadata(runs: dict[str, Path], exported: dict[str, Any]) -> None:
    proc = exported["resnet"]
    assert_ok(proc)
    folder = runs["resnet"] / "export"
    for name in ("best.torchscript", "best.onnx", "best_int8.onnx", "best.xml", "best.bin"):
        assert (folder / name).is_file() and (folder / name).stat().st_size > 0, f"{name} missing\n{describe(proc)}"
    ckpt = torch.load(runs["resnet"] / "best.pt", map_location="cpu", weights_only=True)
    for name, precision in (("best.torchscript", "fp32"), ("best.onnx", "fp32"), ("best_int8.onnx", "int8"), ("best.xml", "fp32")):
        info = json.loads((folder / f"{name}.json").read_text(encoding="utf-8"))
        assert info["parity"]["ok"] is True, info["parity"]
        assert info["precision"] == precision and info["file"] == name
        assert info["class_names"] == ckpt["class_names"] == sorted(CLASSES, key=str.casefold)
        assert info["preprocess"] == ckpt["preprocess"]
        assert info["image_size"] == 32 and info["image_channel"] == 3 and info["num_classes"] == 3
        assert info["input"]["shape"] == ["batch", 3, 32, 32] and info["dynamic"] is True
        assert info["parity"]["images"] == SPLITS["val"] * len(CLASSES)  # the run's val split
        if precision == "fp32":
            assert info["parity"]["max_abs_diff"] <= FP32_TOLERANCE
        else:
            assert info["parity"]["top1_agreement"] >= 0.95
    assert info["deploy"]["fused_conv_bn"] > 0  # resnet10t's BatchNorms are folded into its convolutions
    assert "parity vs PyTorch" in proc.stdout and "FAILED" not in proc.stdout


def test_onnx_dynamic_batch_matches_torch_and_metadata_round_trips(runs: dict[str, Path], exported: dict[str, Any]) -> None:
    import onnx
    import onnxruntime as ort

    from utils.core.checkpoint import load_checkpoint
    from utils.data.transforms import Normalize
    from utils.infer.backends import load_backend

    assert_ok(exported["resnet"])
    file = runs["resnet"] / "export" / "best.onnx"
    ckpt = load_checkpoint(runs["resnet"] / "best.pt")
    # metadata_props, as any ONNX tool reads them
    props = {p.key: p.value for p in onnx.load(str(file)).metadata_props}
    spec = ckpt.meta.preprocess
    assert json.loads(props["class_names"]) == list(ckpt.meta.class_names)
    assert json.loads(props["mean"]) == list(spec.mean) and json.loads(props["std"]) == list(spec.std)
    assert props["image_size"] == "32" and props["image_channel"] == "3" and props["resize_mode"] == spec.resize_mode
    assert props["model_name"] == "resnet10t" and json.loads(props["preprocess"]) == spec.to_dict()
    session = ort.InferenceSession(str(file), providers=["CPUExecutionProvider"])
    for key, port in (("input", session.get_inputs()[0]), ("output", session.get_outputs()[0])):
        described = json.loads(props[key])  # what the metadata says the graph takes and gives ...
        assert described["name"] == port.name and described["shape"] == port.shape, (key, described, port.shape)
    assert json.loads(props["output"])["shape"] == ["batch", 3]  # ... the logits of the 3 classes, any batch
    backend = load_backend(file, "onnx")
    assert backend.meta == ckpt.meta
    assert load_backend(runs["resnet"], "onnx").file == file  # a run folder finds export/best.onnx

    # the raw model at batch 1 and 3 (normalised float input, as documented) against PyTorch
    images = split_images(runs)[:3]
    torch_logits = load_backend(runs["resnet"])(images)
    assert session.get_inputs()[0].name == "images" and not isinstance(session.get_inputs()[0].shape[0], int)
    x = Normalize(spec.mean, spec.std)(images).numpy()
    for n in (1, 3):
        out = torch.from_numpy(session.run(None, {"images": x[:n]})[0])
        assert out.shape == (n, 3)
        diff = (out.softmax(1) - torch_logits[:n].softmax(1)).abs().max().item()
        assert diff <= FP32_TOLERANCE, f"batch {n}: max |dp| {diff}"


FRESH_PROCESS = """
import json, sys
from pathlib import Path
sys.modules["timm"] = None  # a deployment machine: no timm, no model code
sys.path.insert(0, sys.argv[1])
from utils.infer.backends import load_backend, predict_probs, preprocess_images
from utils.data.decode import load_image
run, data = Path(sys.argv[2]), Path(sys.argv[3])
out = {}
for model_type, path in (("torchscript", run), ("onnx", run), ("openvino", run), ("onnx_int8", run / "export" / "best_int8.onnx")):
    backend = load_backend(path, model_type.split("_")[0], "cpu")
    files = sorted(data.rglob("*.png"))
    images = preprocess_images(backend.meta, [load_image(f, backend.meta.image_channel) for f in files])
    out[model_type] = {"probs": predict_probs(backend, images).tolist(), "meta": backend.meta.to_dict()}
print(json.dumps(out))
"""


def test_exported_models_in_a_fresh_process_without_timm_agree_with_torch(runs: dict[str, Path], exported: dict[str, Any]) -> None:
    from utils.core.checkpoint import load_checkpoint

    assert_ok(exported["resnet"])
    proc = subprocess.run([sys.executable, "-c", FRESH_PROCESS, str(REPO), str(runs["resnet"]), str(runs["data"] / "test")],
                          cwd=runs["root"], env=dict(os.environ) | SUBPROCESS_ENV, capture_output=True, text=True, timeout=300)
    assert_ok(proc)
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    reference = probs_of(runs["resnet"], "torch", split_images(runs))
    meta = load_checkpoint(runs["resnet"] / "best.pt").meta.to_dict()
    for model_type, result in results.items():
        probs = torch.tensor(result["probs"])
        assert result["meta"] == meta, model_type
        assert probs.shape == reference.shape
        agreement = (probs.argmax(1) == reference.argmax(1)).float().mean().item()
        if model_type == "onnx_int8":
            assert agreement >= 0.95, f"int8 top-1 agreement {agreement:.1%}"
        else:
            diff = (probs - reference).abs().max().item()
            assert diff <= FP32_TOLERANCE, f"{model_type}: max |dp| {diff}"
            assert agreement == 1.0


def test_repvgg_exports_in_deploy_form_with_the_same_outputs(runs: dict[str, Path], exported: dict[str, Any]) -> None:
    import onnx

    proc = exported["repvgg"]
    assert_ok(proc)
    file = runs["repvgg"] / "export" / "best.onnx"
    info = json.loads((file.parent / "best.onnx.json").read_text(encoding="utf-8"))
    assert info["deploy"]["reparameterized"] == 22 and info["parity"]["ok"] is True  # RepVGG-A0: 22 blocks
    assert info["simplified"] is True and info["dynamic"] is False and info["input"]["shape"] == [2, 3, 32, 32]
    ops = [node.op_type for node in onnx.load(str(file)).graph.node]
    # deploy form: one 3x3 convolution per block, no 1x1 / identity branches to add up
    assert ops.count("Conv") == 22 and "Add" not in ops and "BatchNormalization" not in ops, ops
    images = split_images(runs)[:5]  # an odd count: the fixed-batch model runs 2 + 2 + (1 padded)
    reference = probs_of(runs["repvgg"], "torch", images)
    assert (reference - reference[0]).abs().max() > 1e-3, "the check needs outputs that differ between images"
    assert (probs_of(file, "onnx", images) - reference).abs().max().item() <= FP32_TOLERANCE
    output = json.loads({p.key: p.value for p in onnx.load(str(file)).metadata_props}["output"])
    assert output["shape"] == [2, 3] == [d.dim_value for d in onnx.load(str(file)).graph.output[0].type.tensor_type.shape.dim]


def test_fixed_batch_openvino_predicts_any_number_of_images_as_torch_does(runs: dict[str, Path],
                                                                           exported: dict[str, Any]) -> None:
    """OpenVINO exported with --batch_size 2 and no --dynamic takes exactly 2 images; 1, 3 and 5
    images (not multiples of 2) are run in padded chunks and give PyTorch's probabilities for each."""
    import openvino as ov

    assert_ok(exported["repvgg"])
    file = runs["repvgg"] / "export" / "best.xml"
    assert list(ov.Core().read_model(str(file)).inputs[0].get_partial_shape().to_shape()) == [2, 3, 32, 32]
    info = json.loads((file.parent / "best.xml.json").read_text(encoding="utf-8"))
    assert info["dynamic"] is False and info["input"]["shape"] == [2, 3, 32, 32] and info["parity"]["ok"] is True
    images = split_images(runs)[:5]
    reference = probs_of(runs["repvgg"], "torch", images)
    for n in (1, 3, 5):
        probs = probs_of(file, "openvino", images[:n])
        assert probs.shape == (n, 3) and (probs - reference[:n]).abs().max().item() <= FP32_TOLERANCE, n


def test_int8_onnx_is_quantised(runs: dict[str, Path], exported: dict[str, Any]) -> None:
    """best_int8.onnx holds int8 weights behind DequantizeLinear nodes, and quantises the activations
    (QuantizeLinear) before every convolution, unlike the float32 file."""
    import onnx
    from onnx import TensorProto

    assert_ok(exported["resnet"])
    graphs = {name: onnx.load(str(runs["resnet"] / "export" / name)).graph for name in ("best.onnx", "best_int8.onnx")}
    ops = {name: [node.op_type for node in graph.node] for name, graph in graphs.items()}
    assert "QuantizeLinear" not in ops["best.onnx"] and "DequantizeLinear" not in ops["best.onnx"]
    graph = graphs["best_int8.onnx"]
    convs = [node for node in graph.node if node.op_type == "Conv"]
    assert len(convs) == ops["best.onnx"].count("Conv") > 0
    assert ops["best_int8.onnx"].count("QuantizeLinear") >= len(convs), ops["best_int8.onnx"]
    made_by = {out: node for node in graph.node for out in node.output}
    int8 = {t.name for t in graph.initializer if t.data_type == TensorProto.INT8}
    for conv in convs:  # input and weight both come through DequantizeLinear; the weight is stored as int8
        data, weight = (made_by.get(name) for name in conv.input[:2])
        assert data is not None and data.op_type == "DequantizeLinear", conv.name
        assert weight is not None and weight.op_type == "DequantizeLinear" and weight.input[0] in int8, conv.name


def test_requests_that_cannot_work_fail_before_any_work(runs: dict[str, Path], exported: dict[str, Any]) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert_user_error(exported["tensorrt"], "--export tensorrt", "CUDA GPU")
    assert not (runs["root"] / "trt").exists()
    assert_user_error(exported["half"], "--half", "CUDA")
    assert not (runs["root"] / "half").exists()


def test_image_size_comes_from_the_run(runs: dict[str, Path]) -> None:
    import export
    from utils.core.log import UserError

    with pytest.raises(UserError, match=r"--image_size 64 differs from the run's \(32\)"):
        export.main(export.parse_args(["--save_path", str(runs["resnet"]), "--image_size", "64"]))


# ---------------------------------------------------------------------------- in process
def test_parity_failure_keeps_the_file_and_flags_it(runs: dict[str, Path], exported: dict[str, Any],
                                                    monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from utils.core.log import UserError
    from utils.deploy import export

    assert_ok(exported["resnet"])
    monkeypatch.setitem(export.PARITY_TOLERANCE, "fp32", {"max_abs_diff": -1.0})  # nothing can pass
    with pytest.raises(UserError, match="parity check failed for best.onnx"):
        export.export_checkpoint(runs["resnet"] / "best.pt",
                                 export.ExportOptions(formats=["onnx"], device="cpu", output_dir=str(tmp_path), parity_images=4))
    assert (tmp_path / "best.onnx").is_file()
    assert json.loads((tmp_path / "best.onnx.json").read_text(encoding="utf-8"))["parity"]["ok"] is False


def test_parity_report_tolerances() -> None:
    from utils.deploy.parity import parity_report

    ref = torch.tensor([[0.7, 0.2, 0.1]] * 20)
    assert parity_report(ref, ref + 5e-5, "fp32")["ok"] is True
    assert parity_report(ref, ref + 2e-4, "fp32")["ok"] is False
    assert parity_report(ref, torch.full_like(ref, float("nan")), "fp16")["ok"] is False
    flipped = ref.clone()
    flipped[0] = torch.tensor([0.1, 0.7, 0.2])
    assert parity_report(ref, flipped, "int8")["top1_agreement"] == pytest.approx(0.95)
    assert parity_report(ref, flipped, "int8")["ok"] is True
    flipped[1] = flipped[0]
    assert parity_report(ref, flipped, "int8")["ok"] is False


def test_deploy_model_folds_batchnorm_without_changing_outputs() -> None:
    import timm

    from utils.deploy.deploy_form import deploy_model

    torch.manual_seed(0)
    model = timm.create_model("resnet10t", num_classes=4).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    x = torch.randn(4, 3, 32, 32)
    deployed, report = deploy_model(model, x)
    assert report["fused_conv_bn"] == sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()) > 0
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in deployed.modules())
    with torch.no_grad():
        assert torch.allclose(deployed(x), model(x), atol=1e-4)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()), "the trained model is left as it was"


def test_export_of_an_exported_file_is_one_line(runs: dict[str, Path], exported: dict[str, Any]) -> None:
    """export.py exports checkpoints: given an exported file it says so, not torch's unpickling message."""
    import export

    from utils.core.log import UserError

    assert_ok(exported["resnet"])
    with pytest.raises(UserError, match=r"best.onnx is a model in the ONNX format: export.py exports a checkpoint"):
        export.main(export.parse_args(["--save_path", str(runs["resnet"] / "export" / "best.onnx"), "--device", "cpu"]))


def test_backend_errors_say_what_to_do(runs: dict[str, Path], exported: dict[str, Any], tmp_path: Path) -> None:
    from utils.core.log import UserError
    from utils.deploy.formats import MODEL_TYPES
    from utils.infer.backends import load_backend

    assert MODEL_TYPES == ("torch", "torchscript", "onnx", "openvino", "tensorrt", "safetensors", "ncnn", "tflite", "coreml")
    assert_ok(exported["resnet"])
    with pytest.raises(UserError, match=r"export.py --save_path .* --export tensorrt"):
        load_backend(runs["resnet"], "tensorrt")
    with pytest.raises(UserError, match="--model_type onnx"):
        load_backend(runs["resnet"] / "export" / "best.onnx", "torch")
    with pytest.raises(UserError, match="--half"):
        load_backend(runs["resnet"], "onnx", "cpu", half=True)
    bare = tmp_path / "model.onnx"
    bare.write_bytes((runs["repvgg"] / "export" / "best.onnx").read_bytes())
    import onnx

    model = onnx.load(str(bare))
    del model.metadata_props[:]
    onnx.save(model, str(bare))
    with pytest.raises(UserError, match="model.onnx.json is missing"):
        load_backend(bare, "onnx")


# ---------------------------------------------------------------------------- metrice.py
def read_metrics(stdout: str) -> dict[str, str]:
    import csv

    folder = Path([ln for ln in stdout.splitlines() if ln.startswith("results: ")][-1].split(": ", 1)[1])
    with (folder / "metrics.csv").open(newline="", encoding="utf-8") as fh:
        return {row["metric"]: row["value"] for row in csv.DictReader(fh)}


@pytest.mark.skipif(not (REPO / "metrice.py").exists(), reason="metrice.py not written yet")
def test_metrice_onnx_gives_the_same_accuracy_as_torch(runs: dict[str, Path], exported: dict[str, Any]) -> None:
    assert_ok(exported["resnet"])
    common = ["--save_path", runs["resnet"], "--task", "test", "--device", "cpu", "--workers", "0"]
    procs = run_many([{"script": "metrice.py", "args": [str(a) for a in [*common, "--model_type", t]]}
                      for t in ("torch", "onnx")])
    for proc in procs:
        assert_ok(proc)
    torch_metrics, *exported_metrics = (read_metrics(p.stdout) for p in procs)
    assert int(float(torch_metrics["images"])) == SPLITS["test"] * len(CLASSES)
    for metrics in exported_metrics:
        assert metrics.keys() == torch_metrics.keys()
        for key in ("images", "acc", "mean_acc", "kappa", "precision", "recall", "f1"):  # from the top-1 classes: equal
            assert metrics[key] == torch_metrics[key], key
        for key in metrics:  # from the probabilities: equal within the float32 tolerance
            assert float(metrics[key]) == pytest.approx(float(torch_metrics[key]), abs=1e-4), key
