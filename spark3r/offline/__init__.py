"""Offline mapping (``spark3r map``): input readers, the map runner, the mcap output writer,
synthetic benchmark sequences. ROS-free."""
