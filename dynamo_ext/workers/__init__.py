"""dynamo_ext.workers — see README.md in this folder for the layer's contract."""
