"""dynamo_ext.engine — see README.md in this folder for the layer's contract."""
