"""Train configs/tests/tiny.yaml in two CPU processes (gloo + DDP); each saves its weights.

Used by tests/engine/test_train_net.py: ``python tests/engine/ddp_two_process_train.py OUTPUT_DIR`` with
$DETECTRON2_DATASETS pointing at the test data. Each rank r writes OUTPUT_DIR/rank<r>.pth:
{"model": state_dict after training, "initial": state_dict before training,
"ddp": whether the trained model was wrapped in DistributedDataParallel, "world_size"}.
The ranks are seeded differently, so identical weights show that DDP synchronised them.
"""
import copy
import os
import sys

import detr_d2  # noqa: F401  (compat fixes first)
import torch
from detectron2.utils import comm
from detectron2.utils.env import seed_all_rng
from detectron2.utils.logger import setup_logger
from torch.nn.parallel import DistributedDataParallel

from detr_d2.compat import launch
from detr_d2.engine import Trainer, build_config, share_cpu_cores

TINY_CONFIG = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "tests", "tiny.yaml")
OPTS = ["SOLVER.MAX_ITER", "3", "SOLVER.IMS_PER_BATCH", "2", "DATASETS.TEST", "()"]


def train_one_rank(output_dir):
    cfg = build_config(TINY_CONFIG, OPTS + ["OUTPUT_DIR", output_dir])
    setup_logger(output_dir, distributed_rank=comm.get_rank())
    share_cpu_cores(cfg)
    seed_all_rng(cfg.SEED + comm.get_rank())
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    is_ddp = isinstance(trainer.model, DistributedDataParallel)
    bare_model = trainer.model.module if is_ddp else trainer.model
    initial = copy.deepcopy(bare_model.state_dict())
    trainer.train()
    torch.save({"model": bare_model.state_dict(), "initial": initial,
                "ddp": is_ddp,
                "world_size": comm.get_world_size()},
               os.path.join(output_dir, f"rank{comm.get_rank()}.pth"))


if __name__ == "__main__":
    launch(train_one_rank, 2, dist_url="auto", args=(sys.argv[1],))
