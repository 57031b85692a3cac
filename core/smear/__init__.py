"""Smear mode: whole fields of view segmented into cells, each scored."""
