"""spark3r_ros: works as an ament_python package (colcon) and as a plain pip package."""
from glob import glob

from setuptools import find_packages, setup

package_name = "spark3r_ros"

setup(
    name=package_name,
    version="0.1.0",
    packages=find_packages(include=["spark3r", "spark3r.*", "spark3r_ros", "spark3r_ros.*"]),
    data_files=[
        ("share/ament_index/resource_index/packages", ["resource/" + package_name]),
        ("share/" + package_name, ["package.xml"]),
        ("share/" + package_name + "/launch", glob("launch/*.launch.py")),
        ("share/" + package_name + "/config", glob("config/*")),
    ],
    package_data={"spark3r_ros": ["dds/*.xml"], "spark3r.accel.native": ["*.c"],
                  "spark3r.models.builtin": ["*.safetensors", "*.md"]},
    include_package_data=True,
    python_requires=">=3.10",
    # Runtime Python deps; ROS message packages come from the ROS install (package.xml) or,
    # without ROS, from tools/requirements.txt.
    install_requires=[
        "numpy",
        "scipy",
        "pillow",
        "safetensors",
        "huggingface_hub",
        "rosbags",
        "opencv-python-headless",
    ],
    extras_require={"test": ["pytest"]},
    zip_safe=False,  # the native kernels are compiled from their installed .c sources
    maintainer="spark3r_ros maintainers",
    maintainer_email="spark3r@example.org",
    description="ROS 2 mapping node: feed-forward 3D reconstruction (VGGT, pi3, DA3) accelerated by Spark3R token reduction.",
    license="Apache-2.0",
    entry_points={
        "console_scripts": [
            "spark3r = spark3r.cli:main",
            "mapping_node = spark3r_ros.mapping_node:main",
        ],
    },
)
