"""prime.auth"""
