"""prime.devnet"""
