"""Small programs the set-up runs by path with another Python (the pinned env's, the user's venv's), which has not
got this package: each uses only the standard library (and pip's vendored packaging) and prints one JSON line.
Nothing here is imported by the set-up itself; this folder holds nothing else, as it becomes the programs' sys.path[0].
"""
