"""dynamo_ext.transport — see README.md in this folder for the layer's contract."""
