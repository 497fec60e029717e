"""idflux: Triton-optimised identity-consistent multi-person generation and training with FLUX."""

from setuptools import find_packages, setup

setup(
    name="idflux",
    version="0.1.0",
    description="Triton kernels, engine and trainer for WithAnyone-style identity-consistent FLUX generation",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["idflux", "idflux.*"]),
    # The trained tiny world (idflux/assets/tiny: safetensors, configs, tokenizers, manifest) ships in the package.
    package_data={"idflux": ["bench_perf/gpu_suite.sh", "assets/tiny/*", "assets/tiny/*/*"]},
    install_requires=[
        # Install torch==2.13.0 first (the Makefile does): a bare range lets pip pull a multi-GB CUDA build.
        "torch>=2.5",
        "triton>=3.0; platform_system == 'Linux'",
        "numpy",
        "diffusers>=0.32",
        "peft>=0.15",  # LoRA on the FLUX backbone (idflux.engine.lora, via diffusers)
        "transformers>=4.46",
        "safetensors>=0.4",
        "numba",
        "scipy",
        "matplotlib",
        "tqdm",
        "pillow",
        "pyyaml",  # idflux train --config (yaml.safe_load)
        # insightface is installed with --no-deps (its own requirements pull opencv-python beside
        # opencv-python-headless); the Makefile does it after this package.
    ],
    extras_require={
        "dev": [
            "pytest",
            "pytest-benchmark",
            "kornia",
            "opencv-python-headless",
            "scikit-image",
            "onnx",
            "onnxruntime",
            # idflux serve and its browser test (tests/serve/test_serve_browser.py drives Debian's chromium)
            "gradio>=5",
            "gradio_image_annotation>=0.3",
            "playwright>=1.40",
        ],
        # idflux serve: the layout page (upload faces, draw their boxes, generate)
        "serve": ["gradio>=5", "gradio_image_annotation>=0.3"],
    },
    entry_points={"console_scripts": ["idflux=idflux.cli:main"]},
)
