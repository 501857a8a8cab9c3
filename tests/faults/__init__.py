"""The fault suite: real daemon, real broker and servers, the simulator's ground truth as oracle."""
