"""Batch keys shared by the data path (collator, loss) and the model operations."""

#: Batch key carrying each row's pool index from the data loader to the loss.
INDEX_KEY = "datasteer_index"
