"""detr_d2: DETR as a detectron2 plugin.

detectron2 itself is not a dependency here because PyPI has no package of that name:
``make install`` (scripts/install_detectron2.py) provides it.
"""
from setuptools import find_packages, setup

setup(
    name="detr_d2",
    version="0.1.0",
    description="DETR (DEtection TRansformer) as a detectron2 plugin",
    # detr_d2_deploy: the torch-free ONNX predictor (numpy, onnxruntime, Pillow; pycocotools for mask RLE; OpenCV to draw)
    packages=find_packages(include=("detr_d2", "detr_d2.*", "detr_d2_deploy", "detr_d2_deploy.*")),
    python_requires=">=3.9",
    install_requires=[
        "torch>=1.10",
        "torchvision",
        "scipy",                   # Hungarian matching (linear_sum_assignment)
        "opencv-python-headless",  # video input of tools/demo.py, image drawing
        "pycocotools",             # COCO json and COCOeval
        "faster-coco-eval>=1.8",   # C++ COCOeval (TEST.COCO_EVAL_IMPL "fast") without detectron2's compiled ops
        "fvcore",                  # FLOP counting, checkpoint helpers
        "iopath",                  # file access as detectron2 does it
        "matplotlib",              # tools/plot_logs.py, Visualizer back end
        "tqdm",                    # progress bars
        "psutil",                  # resident-memory readings in tools/benchmark.py
    ],
    extras_require={
        # transformers/timm: the conversion tests build Hugging Face DETR models to compare with;
        # safetensors: tools/convert_detr_checkpoint.py reads/writes transformers' model.safetensors;
        # pytest-xdist: the parallel workers of make test and make test-quick
        "test": ["pytest", "pytest-timeout", "pytest-xdist>=3.5", "transformers>=4.40", "timm>=0.9", "safetensors>=0.4"],
        "convert": ["safetensors>=0.4"],
        # tools/export_model.py (dynamo ONNX exporter: onnxscript), tools/predict_onnx.py
        "export": ["onnx>=1.23", "onnxruntime>=1.31", "onnxscript"],
    },
)
