"""Where pairs and images come from: the original's pair table and the field's datasets as published, image
references (paths, bytes, parquet cells), decoding, the training Dataset and its epoch order, generation tables,
prompt files.
"""
