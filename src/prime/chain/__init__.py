"""prime.chain"""
