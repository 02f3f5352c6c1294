"""Retrieval over local documents: test collections in the BEIR layout, retrievers, and trec_eval's measures."""
