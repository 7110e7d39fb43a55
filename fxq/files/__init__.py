"""The .fxq file: what it holds, how it is checked, and how it is read back without running
anything it carries.
"""
