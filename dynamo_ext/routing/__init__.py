"""dynamo_ext.routing — see README.md in this folder for the layer's contract."""
