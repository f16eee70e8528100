"""pip install . gives lisa_core (the model, no ROS), training, and the pure-Python parts of lisa_ros.

The ROS node and its messages come from `colcon build` on a ROS 2 install (see README.md).
"""

from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

INTERFACES = Path("msg")
PACKAGED_INTERFACES = Path("lisa_ros") / "interfaces" / "msg"  # lisa_ros.bag reads them there


class build_py_with_interfaces(build_py):
    """Also puts msg/*.msg inside the built lisa_ros package: lisa-bag registers the message types
    from them where no colcon install provides them."""

    def run(self):
        super().run()
        target = Path(self.build_lib) / PACKAGED_INTERFACES
        target.mkdir(parents=True, exist_ok=True)
        for definition in sorted(INTERFACES.glob("*.msg")):
            self.copy_file(str(definition), str(target / definition.name))


setup(
    name="lisa_ros",
    version="0.1.0",
    description="LISA reasoning segmentation for robots: the model, its training, and a ROS 2 node",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["lisa_core", "lisa_core.*", "lisa_ros", "lisa_ros.*",
                                    "training", "training.*"]),
    install_requires=[
        "torch>=2.4",
        "transformers>=5.0",
        "segment-anything>=1.0",
        "safetensors",
        "tokenizers",
        "numpy",
        "pillow",
        "opencv-python-headless",
    ],
    extras_require={
        "training": ["peft>=0.13", "accelerate>=1.0", "matplotlib", "pyyaml", "tqdm"],
        "ros": ["ros-jazzy-rclpy", "ros-jazzy-std-msgs", "ros-jazzy-sensor-msgs",
                "ros-jazzy-geometry-msgs", "ros-jazzy-action-msgs", "ros-jazzy-diagnostic-msgs",
                "ros-jazzy-visualization-msgs"],
        "quantization": ["bitsandbytes"],
        "bag": ["rosbags", "tqdm"],
    },
    cmdclass={"build_py": build_py_with_interfaces},
    entry_points={
        "console_scripts": [
            "lisa-segment = lisa_core.cli:main",
            "lisa-bag = lisa_ros.bag:main",
        ],
    },
)
