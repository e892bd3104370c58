"""dynamo_ext.discovery — see README.md in this folder for the layer's contract."""
