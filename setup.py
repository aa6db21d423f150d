"""ament_python package, also pip-installable (``pip install -e .``)."""
from glob import glob

from setuptools import find_packages, setup

PACKAGE = "ivf_ros"

setup(
    name=PACKAGE,
    version="0.1.0",
    packages=find_packages(include=[PACKAGE, f"{PACKAGE}.*"]),
    data_files=[
        ("share/ament_index/resource_index/packages", [f"resource/{PACKAGE}"]),
        (f"share/{PACKAGE}", ["package.xml"]),
        (f"share/{PACKAGE}/launch", glob("launch/*.py")),
        (f"share/{PACKAGE}/config", glob("config/*")),
        (f"share/{PACKAGE}/models", glob("models/*")),
    ],
    install_requires=["numpy", "opencv-python-headless", "safetensors", "pyyaml", "tqdm", "torch"],
    zip_safe=True,
    maintainer="ivf_ros developers",
    maintainer_email="ivf_ros@example.com",
    description="Infrared + visible image fusion and segmentation for ROS 2, with distilled foundation-model priors.",
    license="MIT",
    entry_points={
        "console_scripts": [
            "ivf = ivf_ros.cli:main",
            "fusion_node = ivf_ros.node:main",
        ],
    },
)
