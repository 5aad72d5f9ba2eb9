"""subtomo.jobs"""
