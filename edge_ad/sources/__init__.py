"""Where frames come from: cameras, video files and streams, folders of still images."""
