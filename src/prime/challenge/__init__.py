"""prime.challenge"""
