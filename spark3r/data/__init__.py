"""Data for the mapper: synthetic scenes (`synthetic`), rosbag2 I/O (`bag_io`), image message
payloads (`image_codec`) and map / trajectory files (`io`). Import the submodules directly; this
package imports nothing so `import spark3r.data` stays cheap and ROS-free."""
