"""Fine-tuning a converted reference checkpoint (class head dropped) on 2-class data."""
import torch
from detectron2.modeling import build_model

from detr_d2.data import register_datasets_from_config, resolve_num_classes
from detr_d2.data.shapes import generate_dataset
from detr_d2.engine import AtomicDetectionCheckpointer, Trainer
from tests.helpers import config_for_fixture, fixture_dir


def finetune_config(fixture, weights, data_root, jsons, output_dir):
    cfg = config_for_fixture(fixture)
    cfg.DATASETS.REGISTER_COCO = (("ft_train", str(jsons["train"]), str(data_root / "images" / "train")),
                                  ("ft_val", str(jsons["val"]), str(data_root / "images" / "val")))
    cfg.DATASETS.TRAIN, cfg.DATASETS.TEST = ("ft_train",), ("ft_val",)
    cfg.MODEL.DETR.NUM_CLASSES = None
    cfg.MODEL.WEIGHTS = str(weights)
    cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN = (96,), 128
    cfg.INPUT.CROP.ENABLED = False
    cfg.SOLVER.IMS_PER_BATCH, cfg.SOLVER.MAX_ITER, cfg.SOLVER.STEPS = 2, 3, ()
    cfg.SOLVER.CHECKPOINT_PERIOD, cfg.TEST.EVAL_PERIOD = 1000, 0
    cfg.DATALOADER.NUM_WORKERS = 0
    output_dir.mkdir()
    cfg.OUTPUT_DIR = str(output_dir)
    return cfg


def test_finetune_from_converted_checkpoint_without_class_head(tmp_path, converted_reference):
    fixture = fixture_dir("detr_upstream_tiny")
    weights, _ = converted_reference("detr_upstream_tiny", "--drop-class-head")
    jsons = generate_dataset(tmp_path / "data", ["star", "cross"], {"train": 4, "val": 2},
                             image_size=96, min_size=20, max_size=40, seed=1)
    cfg = finetune_config(fixture, weights, tmp_path / "data", jsons, tmp_path / "out")
    register_datasets_from_config(cfg)
    resolve_num_classes(cfg)
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    model = trainer.model
    assert model.class_embed.out_features == 3
    reference = torch.load(weights, weights_only=True)["model"]
    loaded = model.state_dict()
    for key, value in reference.items():
        torch.testing.assert_close(loaded[key], value, atol=0, rtol=0, msg=key)
    before = model.transformer.decoder.layers[0].linear1.weight.detach().clone()
    trainer.train()
    assert trainer.iter == cfg.SOLVER.MAX_ITER
    assert not torch.equal(before, model.transformer.decoder.layers[0].linear1.weight)
    assert (tmp_path / "out" / "model_final.pth").is_file()


def test_full_coco_head_checkpoint_skips_the_mis_shaped_head(converted_reference):
    fixture = fixture_dir("detr_upstream_tiny")
    weights, _ = converted_reference("detr_upstream_tiny")
    cfg = config_for_fixture(fixture)
    cfg.MODEL.DETR.NUM_CLASSES = 2
    model = build_model(cfg)
    head_before = model.class_embed.weight.detach().clone()
    AtomicDetectionCheckpointer(model).load(str(weights))
    assert torch.equal(model.class_embed.weight, head_before)
    reference = torch.load(weights, weights_only=True)["model"]
    torch.testing.assert_close(model.query_embed.weight, reference["query_embed.weight"])
