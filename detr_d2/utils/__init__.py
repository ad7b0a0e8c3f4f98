"""Helpers shared by the command-line tools (tools/demo.py, visualize_data.py,
plot_logs.py, analyze_model.py).

* ``tool_arguments``: the parser (config overrides positional or after ``--opts``), the
  arguments several tools share, argument types;
* ``tool_setup``: config loading, class-name metadata, logging, one-line error exits;
* ``inputs``: expanding files / folders / globs into images and videos, output names;
* ``predictor``: a batch predictor (test-time resize, weights loading, score threshold);
* ``outputs``: drawings with detectron2's Visualizer, COCO-format result records, atomic
  PNG / JSON writes.
* ``attention_drawing``: DETR's attention grids of tools/visualize_attention.py;
  ``sampling_drawing``: its grids of DeformableDetr's and Dino's sampling points;
  ``panel_grid``: the captioned panels both are made of;
* ``demo_steps``: the timed, echoed steps of tools/run_demo.py and tools/run_panoptic_demo.py.
"""
