"""subtomo.cli"""
