"""dynamo_ext.topology — see README.md in this folder for the layer's contract."""
