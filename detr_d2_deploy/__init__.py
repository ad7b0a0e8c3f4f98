"""Run a DETR exported by ``tools/export_model.py --format onnx`` without torch or detectron2.

Needs numpy, onnxruntime and Pillow; OpenCV (``cv2``) only to draw detections. Nothing here
imports torch, detectron2 or ``detr_d2`` (whose ``__init__`` imports torch), so the package
can be copied to a machine that has only those libraries. This ``__init__`` imports
nothing, so that ``detr_d2`` can use ``inputs`` without onnxruntime installed.

Modules: ``spec`` (``DIR/export.json``: what the graph takes and returns, how to prepare
images), ``images`` (read, resize, normalise, pad: what tools/demo.py does before its
model), ``detections`` (graph outputs -> boxes, scores, labels), ``predictor``
(``OnnxDetrPredictor``, onnxruntime), ``inputs`` (which files ``--input`` names),
``outputs`` (predictions.json records, drawings), ``files`` (atomic writes), ``run`` (one
run of tools/predict_onnx.py), ``errors``.
"""
