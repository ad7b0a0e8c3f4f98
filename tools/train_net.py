#!/usr/bin/env python
"""Train or evaluate DETR, Deformable DETR or DINO with detectron2's engine.

Run from the repository root with detr_d2 installed (``make install``):

    python tools/train_net.py --config-file configs/detr_r50.yaml [--num-gpus N] [--resume] \
        [[--opts] KEY VALUE ...]
    python tools/train_net.py --config-file CFG --eval-only MODEL.WEIGHTS model.pth
    multi-machine: add --num-machines M --machine-rank R --dist-url tcp://HOST:PORT

On a machine without CUDA add ``MODEL.DEVICE cpu``; ``--num-gpus N`` then starts N
processes that train together over gloo. Outputs (log.txt, config.yaml, metrics.json,
TensorBoard events, checkpoints, inference/) go to OUTPUT_DIR.

A problem with the config or the data (unknown key, value of the wrong type or range,
unwritable OUTPUT_DIR, unregistered dataset, unreadable annotation file, missing or
unreadable image, missing or unusable weights) and a training that diverges (NaN/inf
losses) are reported as one message without a traceback, and the exit status is non-zero.

Checkpoints (MODEL.WEIGHTS, the last checkpoint with --resume) are read without running
code from the file: tensors only for .pth, NumPy arrays only for .pkl. ``--trust-pickle``
allows full unpickling for files whose origin you trust.
"""
import sys

import detr_d2  # noqa: F401  (first: applies the compat fixes and registers Detr)
from detectron2.engine import default_argument_parser, default_setup
from detectron2.evaluation import verify_results
from detectron2.utils import comm
from torch.multiprocessing import ProcessExitedException

from detr_d2.compat import launch
from detr_d2.data import register_datasets_from_config
from detr_d2.engine import AtomicDetectionCheckpointer, Trainer, build_config, check_training_setup, share_cpu_cores
from detr_d2.engine.config_checks import check_amp, check_device, check_output_dir, check_weights_to_load
from detr_d2.engine.one_line_errors import ONE_LINE_ERRORS, user_error_message
from detr_d2.evaluation import check_evaluator_types
from detr_d2.utils.tool_arguments import ToolArgumentParser, add_config_overrides, add_trust_pickle


def build_parser():
    """detectron2's ``default_argument_parser``, its overrides also after ``--opts``, plus
    ``--trust-pickle``."""
    parser = ToolArgumentParser(__doc__, parents=[default_argument_parser()], add_help=False)
    add_config_overrides(parser, positional=False)
    add_trust_pickle(parser, what="MODEL.WEIGHTS / the resumed checkpoint (by default only tensors and "
                                  "NumPy arrays are read)")
    return parser


def check_run(cfg, args):
    """The cheap checks of the run (device, AMP, weights file, OUTPUT_DIR, an evaluator for
    each test set); ``build_config`` has checked the config's values and dataset names."""
    if args.eval_only:
        check_device(cfg)
        check_amp(cfg)
    else:
        check_training_setup(cfg)
    check_evaluator_types(cfg.DATASETS.TEST, cfg=cfg)
    check_weights_to_load(cfg, args.resume)
    check_output_dir(cfg)


def evaluate(cfg, resume, trust_pickle=False):
    """COCO evaluation of MODEL.WEIGHTS (or with ``resume``, OUTPUT_DIR's last checkpoint)."""
    model = Trainer.build_model(cfg)
    checkpointer = AtomicDetectionCheckpointer(model, save_dir=cfg.OUTPUT_DIR, trust_pickle=trust_pickle)
    use_last = resume and checkpointer.has_checkpoint()
    checkpointer.load_for_inference(checkpointer.get_checkpoint_file() if use_last else cfg.MODEL.WEIGHTS)
    results = Trainer.test(cfg, model)
    if comm.is_main_process():
        verify_results(cfg, results)
    return results


def main(args, cfg):
    """One process of the run: set up logging and OUTPUT_DIR, then train or evaluate ``cfg``.

    ``run`` has built and checked ``cfg`` before starting the processes; a process that
    ``launch`` started registers the DATASETS.REGISTER_COCO datasets again (the catalogs
    are per process; a repeat in the same process is a no-op).
    """
    register_datasets_from_config(cfg)
    default_setup(cfg, args)
    share_cpu_cores(cfg)
    if args.eval_only:
        return evaluate(cfg, args.resume, args.trust_pickle)
    trainer = Trainer(cfg, trust_pickle=args.trust_pickle)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


def exit_with(error):
    """End the process with ``ERROR: <message>`` on stderr (exit status 1)."""
    sys.exit(f"ERROR: {user_error_message(error)}")


def main_reporting_user_errors(args, cfg):
    """``main``, ending the process with the message of a config/data/divergence error, no
    traceback."""
    try:
        return main(args, cfg)
    except ONE_LINE_ERRORS as error:
        exit_with(error)


def run(args):
    """Build and check the config once, in this process, then run ``main`` with it in each
    process of the job."""
    try:
        cfg = build_config(args.config_file, args.opts)
        check_run(cfg, args)
    except ONE_LINE_ERRORS as error:
        exit_with(error)
    try:
        launch(main_reporting_user_errors, args.num_gpus, num_machines=args.num_machines,
               machine_rank=args.machine_rank, dist_url=args.dist_url, args=(args, cfg))
    except ProcessExitedException as error:
        if error.exit_code is None or error.exit_code <= 0:  # killed by a signal: say so
            raise
        sys.exit(error.exit_code)  # the worker printed why it exited


if __name__ == "__main__":
    run(build_parser().parse_args())
