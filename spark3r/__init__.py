"""spark3r: ROS-free core (models, token reduction, geometry, streaming mapper, evaluation)."""

__version__ = "0.1.0"
