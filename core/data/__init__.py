"""Finding, decoding, labelling and splitting images (files, folders, zips), patients kept apart."""
