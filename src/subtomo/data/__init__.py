"""subtomo.data"""
