"""dynamo_ext.kv — see README.md in this folder for the layer's contract."""
