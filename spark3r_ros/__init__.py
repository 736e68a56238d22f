"""Thin ROS 2 layer over the spark3r core: message conversions, DDS set-up, the mapping node."""
